//! A Merkle tree over all balances, so one account's balance can be proven against a
//! published root without the rest of the ledger (and settled on a chain later).
//!
//! Leaves are `blake3("tessera-leaf" ‖ len(name) ‖ name ‖ balance as 16 LE bytes)` in
//! account order ([`crate::Account`]'s `Ord`); a node is `blake3("tessera-node" ‖ left ‖ right)`; an odd node at
//! the end of a level is carried up unchanged. The empty tree's root is
//! `blake3("tessera-empty")`. Domain-separating leaves from nodes stops a node being
//! passed off as a leaf.

use serde::{Deserialize, Serialize};

pub type Hash = [u8; 32];

pub fn leaf_hash(account: &str, balance: u128) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"tessera-leaf");
    h.update(&(account.len() as u64).to_le_bytes());
    h.update(account.as_bytes());
    h.update(&balance.to_le_bytes());
    *h.finalize().as_bytes()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"tessera-node");
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// One step of a proof: the sibling's hash and whether it sits on the left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub sibling: String,
    pub sibling_on_left: bool,
}

/// A proof that `account` held `balance` under a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub account: String,
    pub balance: String,
    pub steps: Vec<Step>,
}

/// The root over `leaves` (already in account order) and, when `prove` is given, the
/// proof path of that leaf index.
pub fn root_and_path(leaves: &[Hash], prove: Option<usize>) -> (Hash, Vec<Step>) {
    if leaves.is_empty() {
        return (*blake3::hash(b"tessera-empty").as_bytes(), Vec::new());
    }
    let mut level = leaves.to_vec();
    let mut index = prove.unwrap_or(usize::MAX);
    let mut path = Vec::new();
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for (i, pair) in level.chunks(2).enumerate() {
            match pair {
                [l, r] => {
                    if index / 2 == i && index != usize::MAX {
                        let (sib, on_left) = if index.is_multiple_of(2) {
                            (r, false)
                        } else {
                            (l, true)
                        };
                        path.push(Step {
                            sibling: to_hex(sib),
                            sibling_on_left: on_left,
                        });
                    }
                    next.push(node_hash(l, r));
                }
                [single] => next.push(*single),
                _ => unreachable!("chunks(2)"),
            }
        }
        if index != usize::MAX {
            index /= 2;
        }
        level = next;
    }
    (level[0], path)
}

pub fn to_hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks a proof against a root given as hex.
pub fn verify(root_hex: &str, proof: &Proof) -> bool {
    let (Some(root), Ok(balance)) = (from_hex(root_hex), proof.balance.parse::<u128>()) else {
        return false;
    };
    let mut h = leaf_hash(&proof.account, balance);
    for step in &proof.steps {
        let Some(sib) = from_hex(&step.sibling) else {
            return false;
        };
        h = if step.sibling_on_left {
            node_hash(&sib, &h)
        } else {
            node_hash(&h, &sib)
        };
    }
    h == root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_proves_and_a_changed_balance_does_not() {
        for n in [1usize, 2, 3, 5, 8, 13] {
            let accounts: Vec<(String, u128)> = (0..n)
                .map(|i| (format!("contributor:c{i}"), i as u128 * 10))
                .collect();
            let leaves: Vec<Hash> = accounts.iter().map(|(a, b)| leaf_hash(a, *b)).collect();
            let (root, _) = root_and_path(&leaves, None);
            for (i, (a, b)) in accounts.iter().enumerate() {
                let (r, steps) = root_and_path(&leaves, Some(i));
                assert_eq!(r, root);
                let proof = Proof {
                    account: a.clone(),
                    balance: b.to_string(),
                    steps,
                };
                assert!(verify(&to_hex(&root), &proof), "n={n} i={i}");
                let forged = Proof {
                    balance: (b + 1).to_string(),
                    ..proof
                };
                assert!(!verify(&to_hex(&root), &forged));
            }
        }
    }
}
