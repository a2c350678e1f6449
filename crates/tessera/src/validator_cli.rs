//! `tessera validator`: the validator role beside a hub. It follows the run from its
//! first round and judges every round again from what the protocol makes public — the
//! run's settings and data set, each round's record (the commits judged, in commit
//! order, with the state digests and batches they name), the blobs on the hub's blob
//! endpoint, θ it steps itself as every node does — with the hub's own judge
//! (`tessera_hub::validator::Validator`, `VerifyConfig::default()`), and reports for
//! every round whether its verdicts agree with the ones the hub published. A hub that
//! refused or accepted other updates than its own rules say is caught by anyone who
//! runs this.
//!
//! It needs each round's blobs while the hub still serves them (until two rounds
//! later), so it is started with the run, like a node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_blobs::{BlobTransport, IrohBlobs, IrohOptions};
use tessera_hub::engine::Judging;
use tessera_hub::validator::Validator;
use tessera_net::http_auth::ClientAuth;
use tessera_node::{HttpHub, HubApi};
use tessera_outer::decode_for;
use tessera_protocol::wire::{Commit, Verdict};
use tessera_protocol::{Hash32, NodeId};
use tessera_train::worker::initial_state;

use crate::RuntimeArgs;

#[derive(Args)]
pub struct ValidatorArgs {
    /// The hub's base URL, e.g. http://127.0.0.1:7000
    #[arg(long)]
    hub: String,
    /// The hub's public key (the hub prints it at start).
    #[arg(long)]
    hub_key: Option<String>,
    /// Identity key file (created if missing).
    #[arg(long, default_value = "validator.key")]
    key: PathBuf,
    /// Where the data set and the validator's history are kept.
    #[arg(long, default_value = "runs/validator")]
    dir: PathBuf,
    /// How long to wait for a round to close before giving up, in seconds.
    #[arg(long, default_value_t = 900)]
    round_timeout: u64,
    /// How this validator attests for a private run's data keys (`configfs`,
    /// `configfs:PCCS_URL` or `test:SEED_FILE`): it judges on the plaintext, so it is
    /// an attested key recipient like a member.
    #[arg(long, value_name = "PROVIDER")]
    attest: Option<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// What must agree between two verdicts on one commit: the decision and why.
fn decision(v: &Verdict) -> (bool, Vec<String>) {
    let names = v
        .flags
        .iter()
        .map(|f| f.split(' ').next().unwrap_or("").to_string())
        .collect();
    (v.accepted, names)
}

pub fn run(args: ValidatorArgs) -> Result<()> {
    let (device, _) = args.runtime.setup()?;
    if device != tch::Device::Cpu {
        eprintln!("validator: scores on the CPU, as the hub does");
    }
    tessera_net::install_tls_provider();
    let (identity, _) = tessera_protocol::Identity::load_or_create(&args.key)?;
    let hub_key = match &args.hub_key {
        Some(text) => Some(
            NodeId::from_hex(text)
                .with_context(|| "--hub-key: give the 64-hex-digit key the hub printed")?,
        ),
        None => None,
    };
    let auth = Arc::new(ClientAuth::new(hub_key));
    let hub = HttpHub::new(
        &args.hub,
        identity.clone(),
        auth,
        Duration::from_secs(60),
        None,
    )?;
    let info = hub.run_info().context("reading the run from the hub")?;
    info.spec
        .validate()
        .context("the hub's run settings are not valid")?;
    let spec = info.spec.clone();
    let dir = args.dir.join(&spec.run_id);
    let provider = tessera_node::quote_provider(&info, args.attest.as_deref())?;
    let access = provider.as_deref().map(|p| (&identity, p));
    let data = Arc::new(tessera_node::fetch_data_as(&hub, &info, &dir, access)?);
    let params = info.model.params_total();
    let codec = spec.codec().map_err(anyhow::Error::msg)?;
    let max = codec.max_encoded_bytes(params as usize) as u64;
    let blobs = IrohBlobs::bind(IrohOptions {
        bind: tessera_node::default_blob_bind(&args.hub),
        relays: info.relays.clone(),
        ..IrohOptions::loopback()
    })
    .context("starting a blob endpoint (with the run's relays)")?;
    // Judged from the first round on: the history must be the hub's.
    let history = dir.join(tessera_hub::validator::HISTORY_FILE);
    let _ = std::fs::remove_file(&history);
    let mut validator = Validator::new(
        spec.clone(),
        info.model.clone(),
        data,
        tessera_verify::VerifyConfig::default(),
        history,
    )
    .map_err(anyhow::Error::msg)?;
    let mut state = initial_state(&spec, &info.model);
    // Under `overlap` a round trains (and is judged) from θ one step older than the
    // one it steps.
    let mut older: Option<Vec<f32>> = None;
    let mut previous: Vec<(NodeId, Vec<f32>)> = Vec::new();
    let fetch = |h: Hash32| -> Result<Vec<u8>> {
        let bytes = blobs
            .fetch(&h.to_hex(), std::slice::from_ref(&info.hub_blobs), max)
            .with_context(|| format!("fetching blob {} from the hub", h.short(12)))?;
        blobs.forget(&h.to_hex());
        Ok(bytes)
    };
    let (mut agreed, mut differed) = (0u64, 0u64);
    for round in 0..spec.rounds {
        let started = Instant::now();
        let rec = loop {
            match hub.round(round) {
                Ok(r) => break r,
                Err(_) if started.elapsed() < Duration::from_secs(args.round_timeout) => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                Err(e) => bail!("round {round} did not close: {e}"),
            }
        };
        let bytes: Vec<Vec<u8>> = rec
            .verdicts
            .iter()
            .map(|v| fetch(v.blob_hash))
            .collect::<Result<_>>()?;
        let updates: Vec<Vec<f32>> = bytes
            .iter()
            .map(|b| decode_for(codec, b, params).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?;
        let commits: Vec<Judging> = rec
            .verdicts
            .iter()
            .map(|v| Judging {
                node: v.node,
                commit: Commit {
                    blob_hash: v.blob_hash,
                    tokens: v.tokens,
                    loss_micro: 0,
                    theta_hash: rec.theta_before,
                    state_hash: v.state_hash,
                },
                batches: v.batches.clone(),
            })
            .collect();
        if !commits.is_empty() {
            let mine = validator
                .verdicts(
                    round,
                    older.as_ref().unwrap_or(&state.theta),
                    &commits,
                    &updates,
                    &previous,
                )
                .map_err(anyhow::Error::msg)?;
            let differing: Vec<String> = rec
                .verdicts
                .iter()
                .zip(&mine)
                .filter(|(theirs, mine)| decision(theirs) != decision(mine))
                .map(|(theirs, mine)| {
                    format!(
                        "{}: hub {:?}, validator {:?}",
                        theirs.node.short(12),
                        decision(theirs),
                        decision(mine)
                    )
                })
                .collect();
            if differing.is_empty() {
                agreed += 1;
                println!(
                    "round {round}: the hub's {} verdicts agree ({} accepted)",
                    mine.len(),
                    mine.iter().filter(|v| v.accepted).count()
                );
            } else {
                differed += 1;
                println!(
                    "round {round}: verdicts DIFFER from the hub's: {}",
                    differing.join("; ")
                );
            }
        }
        // θ steps as every node steps it, from the accepted updates in node order.
        let accepted: Vec<Vec<u8>> = rec
            .accepted
            .iter()
            .map(|(_, h)| {
                let k = rec.verdicts.iter().position(|v| v.blob_hash == *h);
                match k {
                    Some(k) => Ok(bytes[k].clone()),
                    None => fetch(*h),
                }
            })
            .collect::<Result<_>>()?;
        if spec.overlap {
            older = Some(state.theta.clone());
        }
        if rec.shards.is_empty() {
            state.apply(codec, spec.aggregator, &accepted)?;
        } else {
            // Sharded: the aggregated shards from the whole updates, each checked
            // against the shard the record names (what members applied).
            let whole = accepted
                .iter()
                .map(|b| decode_for(codec, b, params).map_err(anyhow::Error::msg))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[f32]> = whole.iter().map(Vec::as_slice).collect();
            let layout = tessera_node::shard_layout(&rec, &spec, params)?;
            let agg = tessera_outer::shard::aggregate_whole(
                spec.shard_codec().map_err(anyhow::Error::msg)?,
                spec.aggregator,
                &refs,
                &layout,
            )?;
            for (s, (mine, theirs)) in agg.shards.iter().zip(&rec.shards).enumerate() {
                if Hash32::of(mine) != theirs.hash {
                    bail!("aggregated shard {s} of round {round} differs from the hub's record");
                }
            }
            state.apply_aggregate(&agg.applied);
        }
        if Hash32(state.digest()) != rec.theta_after {
            bail!("θ after round {round} differs from the hub's record; the validator can't go on");
        }
        previous = rec
            .accepted
            .iter()
            .zip(&accepted)
            .map(|((n, _), b)| {
                Ok((
                    *n,
                    decode_for(codec, b, params).map_err(anyhow::Error::msg)?,
                ))
            })
            .collect::<Result<_>>()?;
    }
    println!("validator: {agreed} round(s) agree with the hub's verdicts, {differed} differ");
    if differed > 0 {
        bail!("the hub's verdicts differ from the validator's in {differed} round(s)");
    }
    Ok(())
}
