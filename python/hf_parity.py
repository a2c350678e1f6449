"""Loads a Tessera checkpoint with Hugging Face transformers and compares.

Usage: python hf_parity.py CHECKPOINT_DIR EXPECTED.json

EXPECTED.json holds {"input_ids": [[...]], "logits": [[[...]]], "text": str,
"token_ids": [...]} written by Tessera. Prints one JSON line with the largest
absolute logit difference and whether the tokenizer agrees.
"""

import json
import sys

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main():
    ckpt, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor(expected["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ours = torch.tensor(expected["logits"], dtype=torch.float32)
    diff = (logits - ours).abs().max().item()
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf_ids = tok.encode(expected["text"], add_special_tokens=False)
    print(json.dumps({
        "max_abs_diff": diff,
        "shape": list(logits.shape),
        "tokenizer_agrees": hf_ids == expected["token_ids"],
        "hf_token_ids": hf_ids[:20],
    }))


if __name__ == "__main__":
    main()
