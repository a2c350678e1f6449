//! The ledger against a simple reference model over 1,000,000 random requests,
//! including replays, duplicate ids with other content, wrong signers, overdrafts,
//! unknown accounts and malformed amounts. After every request both must agree on
//! acceptance; balances are compared in full throughout, and the ledger's own
//! invariants are asserted on every commit. A second test sends a shorter stream
//! through SQLite and checks that a reopened ledger equals the in-memory one.

use std::collections::{BTreeMap, HashMap, HashSet};

use tessera_ledger::state::SlashTo;
use tessera_ledger::{
    Account, Amount, Ledger, LedgerConfig, MemoryStore, Operation, Request, Signer, SqliteStore,
    State, Store, Work,
};

const DELAY_MS: u64 = 50;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const CONTRIBUTORS: &[&str] = &["c0", "c1", "c2", "c3", "c4", "c5", "c6", "ghost"];
const RUNS: &[&str] = &["r0", "r1", "r2"];
const MODELS: &[&str] = &["m0", "m1"];

/// The reference: plain maps and the rules written out as simply as possible.
#[derive(Default)]
struct Model {
    balances: HashMap<String, u128>,
    issued: u128,
    seen: HashMap<String, String>,
    runs: HashMap<String, (String, u128)>,
    paid: HashSet<(String, u64)>,
    shares: HashMap<String, BTreeMap<String, u128>>,
    unbonding: HashMap<(String, String), Vec<(u128, u64)>>,
    last_epoch: Option<u64>,
}

impl Model {
    fn bal(&self, a: &str) -> Option<u128> {
        self.balances.get(a).copied()
    }

    /// Largest-remainder split written independently of the ledger's 256-bit version
    /// (the amounts here are small enough for u128 products).
    fn split(total: u128, weights: &[u128]) -> Option<Vec<u128>> {
        let sum: u128 = weights.iter().sum();
        if sum == 0 {
            return None;
        }
        let mut parts: Vec<u128> = weights.iter().map(|w| total * w / sum).collect();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(total * weights[i] % sum), i));
        let left = total - parts.iter().sum::<u128>();
        for &i in order.iter().take(left as usize) {
            parts[i] += 1;
        }
        Some(parts)
    }

    /// Applies `moves` (debit, credit, amount) all-or-nothing.
    fn transfer(&mut self, moves: &[(String, String, u128)]) -> bool {
        let mut b = self.balances.clone();
        let mut issued = self.issued;
        for (d, c, a) in moves {
            if *a == 0 {
                continue;
            }
            if d == "issuance" {
                issued += a;
            } else {
                match b.get(d) {
                    Some(have) if have >= a => *b.get_mut(d).unwrap() -= a,
                    _ => return false,
                }
            }
            *b.entry(c.clone()).or_insert(0) += a;
        }
        self.balances = b;
        self.issued = issued;
        true
    }

    fn apply(&mut self, req: &Request, now: u64) -> bool {
        let body = serde_json::to_string(req).unwrap();
        if let Some(old) = self.seen.get(&req.id) {
            return *old == body;
        }
        let organiser = req.signer == Signer::Organiser;
        let may = |c: &str| organiser || req.signer == Signer::Contributor(c.to_string());
        let ok = match &req.op {
            Operation::Sale {
                buyer,
                tokens,
                treasury_tokens,
                ..
            } => {
                organiser
                    && (tokens.0 > 0 || treasury_tokens.0 > 0)
                    && self.transfer(&[
                        ("issuance".into(), format!("contributor:{buyer}"), tokens.0),
                        ("issuance".into(), "treasury".into(), treasury_tokens.0),
                    ])
            }
            Operation::Fund {
                run,
                model,
                amount,
                reward_per_round,
            } => {
                let same_model = self.runs.get(run).is_none_or(|r| r.0 == *model);
                let ok = organiser
                    && amount.0 > 0
                    && reward_per_round.0 > 0
                    && same_model
                    && self.transfer(&[("treasury".into(), format!("pool:{run}"), amount.0)]);
                if ok {
                    self.runs
                        .insert(run.clone(), (model.clone(), reward_per_round.0));
                }
                ok
            }
            Operation::Payout { run, round, work } => {
                let Some((model, per_round)) = self.runs.get(run).cloned() else {
                    return false;
                };
                let mut names: Vec<&String> = work.iter().map(|w| &w.contributor).collect();
                names.sort();
                names.dedup();
                if !organiser
                    || self.paid.contains(&(run.clone(), *round))
                    || names.len() != work.len()
                    || work.iter().any(|w| w.score_ppm > 1_000_000)
                {
                    return false;
                }
                let mut entries: Vec<(String, u128)> = work
                    .iter()
                    .map(|w| {
                        (
                            w.contributor.clone(),
                            w.tokens as u128 * w.score_ppm as u128,
                        )
                    })
                    .collect();
                entries.sort();
                let pool = format!("pool:{run}");
                let reward = per_round.min(self.bal(&pool).unwrap_or(0));
                if reward == 0 {
                    return false;
                }
                let Some(parts) =
                    Self::split(reward, &entries.iter().map(|e| e.1).collect::<Vec<_>>())
                else {
                    return false;
                };
                let moves: Vec<_> = entries
                    .iter()
                    .zip(&parts)
                    .map(|((c, _), p)| (pool.clone(), format!("contributor:{c}"), *p))
                    .collect();
                assert!(self.transfer(&moves));
                self.paid.insert((run.clone(), *round));
                let s = self.shares.entry(model).or_default();
                for (c, w) in entries {
                    *s.entry(c).or_insert(0) += w;
                }
                true
            }
            Operation::Stake {
                run,
                contributor,
                amount,
            } => {
                may(contributor)
                    && self.runs.contains_key(run)
                    && amount.0 > 0
                    && self.transfer(&[(
                        format!("contributor:{contributor}"),
                        format!("stake:{run}:{contributor}"),
                        amount.0,
                    )])
            }
            Operation::Unbond {
                run,
                contributor,
                amount,
            } => {
                let pending = self
                    .unbonding
                    .get(&(run.clone(), contributor.clone()))
                    .map_or(0, Vec::len);
                let ok = may(contributor)
                    && self.runs.contains_key(run)
                    && amount.0 > 0
                    && pending < tessera_ledger::state::UNBONDING_ENTRIES_MAX
                    && self.transfer(&[(
                        format!("stake:{run}:{contributor}"),
                        format!("unbonding:{run}:{contributor}"),
                        amount.0,
                    )]);
                if ok {
                    self.unbonding
                        .entry((run.clone(), contributor.clone()))
                        .or_default()
                        .push((amount.0, now + DELAY_MS));
                }
                ok
            }
            Operation::Release { run, contributor } => {
                let key = (run.clone(), contributor.clone());
                let matured: u128 = self
                    .unbonding
                    .get(&key)
                    .map_or(0, |v| v.iter().filter(|p| p.1 <= now).map(|p| p.0).sum());
                let ok = may(contributor)
                    && self.runs.contains_key(run)
                    && matured > 0
                    && self.transfer(&[(
                        format!("unbonding:{run}:{contributor}"),
                        format!("contributor:{contributor}"),
                        matured,
                    )]);
                if ok {
                    self.unbonding.get_mut(&key).unwrap().retain(|p| p.1 > now);
                }
                ok
            }
            Operation::Slash {
                run,
                contributor,
                fraction_ppm,
                ..
            } => {
                let stake = format!("stake:{run}:{contributor}");
                let amount = self.bal(&stake).unwrap_or(0) * *fraction_ppm as u128 / 1_000_000;
                organiser
                    && self.runs.contains_key(run)
                    && *fraction_ppm <= 1_000_000
                    && amount > 0
                    && self.transfer(&[(stake, "burned".into(), amount)])
            }
            Operation::Revenue {
                model,
                payer,
                amount,
                reinvest_ppm,
            } => {
                let Some(shares) = self.shares.get(model).cloned() else {
                    return false;
                };
                if !organiser || amount.0 == 0 || *reinvest_ppm > 1_000_000 {
                    return false;
                }
                let reinvest = amount.0 * *reinvest_ppm as u128 / 1_000_000;
                let parts = Self::split(
                    amount.0 - reinvest,
                    &shares.values().copied().collect::<Vec<_>>(),
                )
                .unwrap();
                let payer = format!("contributor:{payer}");
                let mut moves = vec![(payer.clone(), "treasury".to_string(), reinvest)];
                moves.extend(
                    shares
                        .keys()
                        .zip(parts)
                        .map(|(c, p)| (payer.clone(), format!("contributor:{c}"), p)),
                );
                self.transfer(&moves)
            }
            Operation::CloseEpoch { epoch } => {
                let ok = organiser && self.last_epoch.is_none_or(|l| *epoch > l);
                if ok {
                    self.last_epoch = Some(*epoch);
                }
                ok
            }
        };
        if ok {
            self.seen.insert(req.id.clone(), body);
        }
        ok
    }
}

fn random_request(rng: &mut Lcg, n: u64, history: &[Request]) -> Request {
    // Some requests reuse an old id: the same request (a replay) or different content.
    if !history.is_empty() && rng.below(20) == 0 {
        let old = &history[rng.below(history.len() as u64) as usize];
        if rng.below(2) == 0 {
            return old.clone();
        }
        let mut other = random_request(rng, n, &[]);
        other.id = old.id.clone();
        return other;
    }
    let amount = |rng: &mut Lcg| {
        Amount(match rng.below(10) {
            0 => 0,
            1 => 1 << 40,
            _ => rng.below(5_000) as u128,
        })
    };
    let c = |rng: &mut Lcg| rng.pick(CONTRIBUTORS).to_string();
    let run = |rng: &mut Lcg| rng.pick(RUNS).to_string();
    let op = match rng.below(11) {
        0 => Operation::Sale {
            buyer: c(rng),
            tokens: amount(rng),
            treasury_tokens: amount(rng),
            proceeds: "10 USD".into(),
        },
        1 => Operation::Fund {
            run: run(rng),
            model: rng.pick(MODELS).to_string(),
            amount: amount(rng),
            reward_per_round: amount(rng),
        },
        2 | 3 => {
            let k = rng.below(5);
            let work = (0..k)
                .map(|_| Work {
                    contributor: c(rng),
                    tokens: rng.below(1 << 20),
                    score_ppm: if rng.below(30) == 0 {
                        1_000_001
                    } else {
                        rng.below(1_000_001) as u32
                    },
                })
                .collect();
            Operation::Payout {
                run: run(rng),
                round: rng.below(400),
                work,
            }
        }
        4 | 5 => Operation::Stake {
            run: run(rng),
            contributor: c(rng),
            amount: amount(rng),
        },
        6 => Operation::Unbond {
            run: run(rng),
            contributor: c(rng),
            amount: amount(rng),
        },
        7 => Operation::Release {
            run: run(rng),
            contributor: c(rng),
        },
        8 => Operation::Slash {
            run: run(rng),
            contributor: c(rng),
            fraction_ppm: rng.below(1_100_000) as u32,
            reason: "audit mismatch".into(),
        },
        9 => Operation::Revenue {
            model: rng.pick(MODELS).to_string(),
            payer: c(rng),
            amount: amount(rng),
            reinvest_ppm: rng.below(1_100_000) as u32,
        },
        _ => Operation::CloseEpoch {
            epoch: rng.below(n / 50 + 2),
        },
    };
    let signer = match rng.below(8) {
        0 => Signer::Contributor(c(rng)),
        1 => match &op {
            Operation::Stake { contributor, .. }
            | Operation::Unbond { contributor, .. }
            | Operation::Release { contributor, .. } => Signer::Contributor(contributor.clone()),
            _ => Signer::Organiser,
        },
        _ => Signer::Organiser,
    };
    Request {
        id: format!("req-{n}"),
        signer,
        op,
    }
}

fn same_balances(state: &State, model: &Model) {
    let ours: BTreeMap<String, u128> = state
        .balances()
        .iter()
        .filter(|(_, b)| **b > 0)
        .map(|(a, b)| (a.to_string(), *b))
        .collect();
    let theirs: BTreeMap<String, u128> = model
        .balances
        .iter()
        .filter(|(_, b)| **b > 0)
        .map(|(a, b)| (a.clone(), *b))
        .collect();
    assert_eq!(ours, theirs);
    assert_eq!(state.issued(), model.issued);
}

fn config() -> LedgerConfig {
    LedgerConfig {
        unbond_delay_ms: DELAY_MS,
        slash_to: SlashTo::Burned,
    }
}

#[test]
fn a_million_random_requests_match_the_reference_model() {
    let mut rng = Lcg(0x5eed);
    let mut ledger = Ledger::open(MemoryStore::new(config())).unwrap();
    let mut model = Model::default();
    let mut history: Vec<Request> = Vec::new();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for n in 0..1_000_000u64 {
        let req = random_request(&mut rng, n, &history);
        let now = n;
        let before = (ledger.state().balances().clone(), ledger.state().issued());
        let ours = ledger.submit(&req, now);
        let theirs = model.apply(&req, now);
        assert_eq!(
            ours.is_ok(),
            theirs,
            "request {n} {req:?}: ledger said {ours:?}"
        );
        match ours {
            Ok(_) => accepted += 1,
            Err(_) => {
                refused += 1;
                assert_eq!(
                    (ledger.state().balances(), ledger.state().issued()),
                    (&before.0, before.1),
                    "a refused request changed balances"
                );
            }
        }
        if history.len() < 5_000 || rng.below(100) == 0 {
            history.push(req);
        }
        if n % 97 == 0 {
            same_balances(ledger.state(), &model);
        }
    }
    same_balances(ledger.state(), &model);
    // The stream must exercise both paths substantially.
    assert!(
        accepted > 200_000 && refused > 200_000,
        "accepted {accepted}, refused {refused}"
    );
    let report = ledger.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn sqlite_ledger_reopens_equal_to_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut disk = Ledger::open(SqliteStore::init(&path, config()).unwrap()).unwrap();
    let mut mem = State::new(config());
    let mut rng = Lcg(99);
    let mut history = Vec::new();
    for n in 0..3_000u64 {
        let req = random_request(&mut rng, n, &history);
        let a = disk.submit(&req, n).map_err(|e| e.to_string());
        let b = mem.apply(&req, n).map_err(|e| e.to_string());
        assert_eq!(a, b);
        history.push(req);
    }
    drop(disk);
    let reopened = Ledger::open(SqliteStore::open(&path).unwrap()).unwrap();
    assert_eq!(reopened.state().balances(), mem.balances());
    assert_eq!(reopened.state().root(), mem.root());
    let report = reopened.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.transfers > 500, "{report:?}");
    let c0 = Account::Contributor("c0".into());
    let h = reopened.store().history(&c0, 10).unwrap();
    assert!(h.iter().all(|t| t.debit == c0 || t.credit == c0));
}

/// Hardening #16: a contributor could add unbonding entries of one base unit without
/// limit, and every later release walked them all. Pending unbonds are now bounded per
/// contributor and run; releasing the matured ones makes room again.
#[test]
fn unbonding_entries_are_bounded() {
    use tessera_ledger::state::UNBONDING_ENTRIES_MAX;
    let mut l = Ledger::open(MemoryStore::new(config())).unwrap();
    let mut n = 0;
    let mut submit = |l: &mut Ledger<MemoryStore>, signer: Signer, op: Operation, now: u64| {
        n += 1;
        l.submit(
            &Request {
                id: format!("r{n}"),
                signer,
                op,
            },
            now,
        )
    };
    let org = || Signer::Organiser;
    let alice = || Signer::Contributor("alice".into());
    let big = Amount(1_000_000_000_000);
    submit(
        &mut l,
        org(),
        Operation::Sale {
            buyer: "alice".into(),
            tokens: big,
            treasury_tokens: big,
            proceeds: "t".into(),
        },
        0,
    )
    .unwrap();
    submit(
        &mut l,
        org(),
        Operation::Fund {
            run: "r".into(),
            model: "m".into(),
            amount: big,
            reward_per_round: Amount(10),
        },
        0,
    )
    .unwrap();
    submit(
        &mut l,
        alice(),
        Operation::Stake {
            run: "r".into(),
            contributor: "alice".into(),
            amount: Amount(1_000),
        },
        0,
    )
    .unwrap();
    let unbond = || Operation::Unbond {
        run: "r".into(),
        contributor: "alice".into(),
        amount: Amount(1),
    };
    for _ in 0..UNBONDING_ENTRIES_MAX {
        submit(&mut l, alice(), unbond(), 1).unwrap();
    }
    let err = submit(&mut l, alice(), unbond(), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pending unbonds"), "{err}");
    let release = Operation::Release {
        run: "r".into(),
        contributor: "alice".into(),
    };
    submit(&mut l, alice(), release, 1 + DELAY_MS).unwrap();
    submit(&mut l, alice(), unbond(), 2 + DELAY_MS).unwrap();
}
