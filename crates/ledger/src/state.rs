//! The ledger's state machine: requests in, transfers out. Pure: no I/O, no clock
//! (`now_ms` is passed in), no randomness.
//!
//! Every request is first *planned* against the current state (validation,
//! authorisation, balances after each transfer) without changing anything; only a
//! plan that is valid as a whole is *committed*. An invalid request therefore changes
//! nothing, and the store persists a plan in one transaction before the state commits
//! it in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::account::{check_id, Account, AccountError};
use crate::amount::Amount;
use crate::merkle;
use crate::split::split;

/// Parts per million: fractions (score weights, slash and reinvest shares) are integers.
pub const PPM: u32 = 1_000_000;
/// Longest request id.
pub const REQUEST_ID_BYTES_MAX: usize = 128;
/// Most entries in one payout's work record.
pub const PAYOUT_ENTRIES_MAX: usize = 100_000;
/// Largest token count one contributor may claim for one round.
pub const WORK_TOKENS_MAX: u64 = 1 << 48;
/// Most pending unbonding entries one contributor may hold in one run. Every release
/// walks them; without a bound, unbonds of one base unit each grew the walk without
/// limit (hardening #16). 64 leaves room for an unbond a day over the default delay
/// several times over; release the matured ones to unbond more.
pub const UNBONDING_ENTRIES_MAX: usize = 64;

/// Ledger-wide settings, fixed at `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// How long unbonded stake waits before it can be released.
    pub unbond_delay_ms: u64,
    /// Where slashed stake goes.
    pub slash_to: SlashTo,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            unbond_delay_ms: 7 * 24 * 3600 * 1000,
            slash_to: SlashTo::Burned,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlashTo {
    Burned,
    Treasury,
}

/// One contributor's verified work in a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    pub contributor: String,
    /// Tokens processed.
    pub tokens: u64,
    /// Verification score weight in parts per million (1,000,000 = fully verified).
    pub score_ppm: u32,
}

/// What a request asks the ledger to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// Issue `tokens` to a buyer and `treasury_tokens` to the treasury; `proceeds`
    /// records what the buyer paid (for example "25000 USD").
    Sale {
        buyer: String,
        tokens: Amount,
        treasury_tokens: Amount,
        proceeds: String,
    },
    /// Move `amount` from the treasury to a run's pool, which pays `reward_per_round`.
    Fund {
        run: String,
        model: String,
        amount: Amount,
        reward_per_round: Amount,
    },
    /// Pay a closed round's reward to its accepted contributors by verified work.
    Payout {
        run: String,
        round: u64,
        work: Vec<Work>,
    },
    Stake {
        run: String,
        contributor: String,
        amount: Amount,
    },
    /// Start returning stake; it can be released after the unbonding delay.
    Unbond {
        run: String,
        contributor: String,
        amount: Amount,
    },
    /// Return all matured unbonded stake to the contributor.
    Release { run: String, contributor: String },
    /// Take `fraction_ppm` of a contributor's stake for proven cheating.
    Slash {
        run: String,
        contributor: String,
        fraction_ppm: u32,
        reason: String,
    },
    /// Model revenue paid by `payer`: `reinvest_ppm` to the treasury, the rest to the
    /// model's contributors by contribution share.
    Revenue {
        model: String,
        payer: String,
        amount: Amount,
        reinvest_ppm: u32,
    },
    /// Record the Merkle root of all balances at the end of an epoch.
    CloseEpoch { epoch: u64 },
}

/// Who signed a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", content = "id", rename_all = "snake_case")]
pub enum Signer {
    /// The run organiser: the only signer who may sell, fund, pay, slash and record revenue.
    Organiser,
    Contributor(String),
}

/// A request: a unique id (re-submitting it is a no-op), its signer and its operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub signer: Signer,
    #[serde(flatten)]
    pub op: Operation,
}

impl Request {
    /// The hash that decides whether a re-submitted id carries the same content.
    pub fn content_hash(&self) -> String {
        let body = serde_json::to_vec(self).expect("request serialises");
        blake3::hash(&body).to_hex().to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Sale,
    TreasuryAllocation,
    Fund,
    Payout,
    Stake,
    Unbond,
    Release,
    Slash,
    Revenue,
    Reinvest,
}

/// One double-entry movement: `amount` leaves `debit` and enters `credit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// `REQUEST_ID/N`: unique across the ledger.
    pub id: String,
    pub request: String,
    pub kind: TransferKind,
    pub debit: Account,
    pub credit: Account,
    pub amount: Amount,
    pub run: Option<String>,
    pub round: Option<u64>,
    pub model: Option<String>,
}

/// What a committed request did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub request: String,
    pub transfers: Vec<Transfer>,
    /// For `close_epoch`: the Merkle root recorded.
    pub root: Option<String>,
}

/// Why a request was refused. A refused request changes nothing.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LedgerError {
    #[error(transparent)]
    BadAccount(#[from] AccountError),
    /// A request id is empty, too long or has characters outside `[A-Za-z0-9_.:/-]`.
    #[error("bad request id `{id}`: 1-{REQUEST_ID_BYTES_MAX} characters of A-Z a-z 0-9 _ . : / -")]
    BadRequestId { id: String },
    /// The id was used before for a request with different content.
    #[error("request id `{id}` was already used for a different request; use a new id")]
    DuplicateId { id: String },
    #[error("unknown account `{account}`")]
    UnknownAccount { account: String },
    #[error("unknown run `{run}`; fund it first")]
    UnknownRun { run: String },
    #[error("model `{model}` has no recorded contributions")]
    UnknownModel { model: String },
    #[error("overdraft: `{account}` holds {balance} base units, {needed} needed")]
    Overdraft {
        account: String,
        balance: u128,
        needed: u128,
    },
    #[error("`{signer}` may not {action}; only {allowed} may")]
    WrongSigner {
        signer: String,
        action: &'static str,
        allowed: &'static str,
    },
    #[error("malformed amount: {reason}")]
    BadAmount { reason: String },
    #[error("round {round} of run `{run}` was already paid by request `{request}`")]
    AlreadyPaid {
        run: String,
        round: u64,
        request: String,
    },
    #[error("run `{run}` pool is empty")]
    PoolEmpty { run: String },
    #[error("bad work record: {reason}")]
    BadWork { reason: String },
    #[error("no unbonded stake of `{contributor}` in run `{run}` has matured{}", .next_release_ms.map(|t| format!("; next release at {t} ms")).unwrap_or_default())]
    NotMatured {
        run: String,
        contributor: String,
        next_release_ms: Option<u64>,
    },
    #[error("`{contributor}` already has {max} pending unbonds in run `{run}`; release the matured ones first")]
    TooManyUnbonding {
        run: String,
        contributor: String,
        max: usize,
    },
    #[error("epoch {epoch} is not after the last closed epoch {last}")]
    EpochOrder { epoch: u64, last: u64 },
    #[error("a run's model cannot change: `{run}` trains `{model}`")]
    ModelChange { run: String, model: String },
}

/// A run's payout schedule and history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunInfo {
    pub model: String,
    pub reward_per_round: u128,
    /// Paid rounds and the request that paid each.
    pub paid: BTreeMap<u64, String>,
}

/// Non-balance changes a plan carries.
#[derive(Debug, Clone)]
enum Aux {
    Run {
        run: String,
        model: String,
        reward_per_round: u128,
    },
    Paid {
        run: String,
        round: u64,
        request: String,
    },
    Shares {
        model: String,
        work: Vec<(String, u128)>,
    },
    UnbondingAdd {
        key: (String, String),
        amount: u128,
        release_at_ms: u64,
    },
    UnbondingTake {
        key: (String, String),
        now_ms: u64,
    },
    Epoch {
        epoch: u64,
        root: String,
    },
}

/// A validated request, ready to commit.
#[derive(Debug, Clone)]
pub struct Plan {
    pub request: Request,
    pub content_hash: String,
    pub receipt: Receipt,
    /// Balances after the plan, for every account it touches (issuance excluded).
    pub balances: Vec<(Account, u128)>,
    issued_delta: u128,
    aux: Vec<Aux>,
}

/// The outcome of planning: a new plan, or the receipt of an earlier identical request.
#[derive(Debug, Clone)]
pub enum Planned {
    New(Box<Plan>),
    Replay(Receipt),
}

/// The whole ledger in memory.
#[derive(Debug, Clone)]
pub struct State {
    pub config: LedgerConfig,
    balances: BTreeMap<Account, u128>,
    issued: u128,
    requests: HashMap<String, (String, Receipt)>,
    runs: BTreeMap<String, RunInfo>,
    shares: BTreeMap<String, BTreeMap<String, u128>>,
    unbonding: BTreeMap<(String, String), Vec<(u128, u64)>>,
    epochs: BTreeMap<u64, String>,
}

fn check_request_id(id: &str) -> Result<(), LedgerError> {
    let ok = !id.is_empty()
        && id.len() <= REQUEST_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadRequestId { id: id.to_string() })
    }
}

fn positive(amount: Amount, what: &str) -> Result<u128, LedgerError> {
    if amount.0 == 0 {
        return Err(LedgerError::BadAmount {
            reason: format!("{what} must be positive"),
        });
    }
    Ok(amount.0)
}

fn fraction(ppm: u32, what: &str) -> Result<u128, LedgerError> {
    if ppm > PPM {
        return Err(LedgerError::BadAmount {
            reason: format!("{what} is {ppm} ppm, at most {PPM}"),
        });
    }
    Ok(ppm as u128)
}

/// Builds a plan's transfers against an overlay of the balances it changes.
struct Builder<'a> {
    state: &'a State,
    request: &'a str,
    overlay: BTreeMap<Account, u128>,
    transfers: Vec<Transfer>,
    issued_delta: u128,
    run: Option<String>,
    round: Option<u64>,
    model: Option<String>,
}

impl Builder<'_> {
    fn balance(&self, a: &Account) -> Option<u128> {
        self.overlay
            .get(a)
            .copied()
            .or_else(|| self.state.balances.get(a).copied())
    }

    fn require(&self, a: &Account) -> Result<u128, LedgerError> {
        self.balance(a).ok_or_else(|| LedgerError::UnknownAccount {
            account: a.to_string(),
        })
    }

    fn move_(
        &mut self,
        kind: TransferKind,
        debit: Account,
        credit: Account,
        amount: u128,
    ) -> Result<(), LedgerError> {
        if amount == 0 {
            return Ok(());
        }
        if debit == Account::Issuance {
            let delta = self.issued_delta + amount;
            if self.state.issued.checked_add(delta).is_none() {
                return Err(LedgerError::BadAmount {
                    reason: "issuance would overflow".into(),
                });
            }
            self.issued_delta = delta;
        } else {
            let have = self.require(&debit)?;
            let left = have
                .checked_sub(amount)
                .ok_or_else(|| LedgerError::Overdraft {
                    account: debit.to_string(),
                    balance: have,
                    needed: amount,
                })?;
            self.overlay.insert(debit.clone(), left);
        }
        let have = self.balance(&credit).unwrap_or(0);
        self.overlay.insert(credit.clone(), have + amount);
        self.transfers.push(Transfer {
            id: format!("{}/{}", self.request, self.transfers.len()),
            request: self.request.to_string(),
            kind,
            debit,
            credit,
            amount: Amount(amount),
            run: self.run.clone(),
            round: self.round,
            model: self.model.clone(),
        });
        Ok(())
    }
}

impl State {
    pub fn new(config: LedgerConfig) -> State {
        let balances = BTreeMap::from([(Account::Treasury, 0), (Account::Burned, 0)]);
        State {
            config,
            balances,
            issued: 0,
            requests: HashMap::new(),
            runs: BTreeMap::new(),
            shares: BTreeMap::new(),
            unbonding: BTreeMap::new(),
            epochs: BTreeMap::new(),
        }
    }

    /// Balance of an account; the issuance account reports −issued as `None`.
    pub fn balance(&self, a: &Account) -> Option<u128> {
        self.balances.get(a).copied()
    }

    pub fn balances(&self) -> &BTreeMap<Account, u128> {
        &self.balances
    }

    pub fn issued(&self) -> u128 {
        self.issued
    }

    pub fn burned(&self) -> u128 {
        self.balances.get(&Account::Burned).copied().unwrap_or(0)
    }

    /// Tokens in circulation: issued minus burned.
    pub fn supply(&self) -> u128 {
        self.issued - self.burned()
    }

    pub fn run(&self, run: &str) -> Option<&RunInfo> {
        self.runs.get(run)
    }

    pub fn shares(&self, model: &str) -> Option<&BTreeMap<String, u128>> {
        self.shares.get(model)
    }

    pub fn epochs(&self) -> &BTreeMap<u64, String> {
        &self.epochs
    }

    pub fn request_count(&self) -> usize {
        self.requests.len()
    }

    pub fn receipt(&self, id: &str) -> Option<&Receipt> {
        self.requests.get(id).map(|r| &r.1)
    }

    /// The Merkle root over all balances (issuance as its negative is left out: it is
    /// implied by the others).
    pub fn root(&self) -> String {
        merkle::to_hex(&self.root_and_path(None).0)
    }

    fn root_and_path(&self, account: Option<&Account>) -> (merkle::Hash, Vec<merkle::Step>) {
        let leaves: Vec<merkle::Hash> = self
            .balances
            .iter()
            .map(|(a, b)| merkle::leaf_hash(&a.to_string(), *b))
            .collect();
        let index = account.and_then(|a| self.balances.keys().position(|k| k == a));
        merkle::root_and_path(&leaves, index)
    }

    /// A proof of `account`'s balance under [`State::root`].
    pub fn prove(&self, account: &Account) -> Result<merkle::Proof, LedgerError> {
        let balance = self
            .balance(account)
            .ok_or_else(|| LedgerError::UnknownAccount {
                account: account.to_string(),
            })?;
        let (_, steps) = self.root_and_path(Some(account));
        Ok(merkle::Proof {
            account: account.to_string(),
            balance: balance.to_string(),
            steps,
        })
    }

    fn authorize(&self, req: &Request) -> Result<(), LedgerError> {
        let organiser_only = |action| match &req.signer {
            Signer::Organiser => Ok(()),
            Signer::Contributor(c) => Err(LedgerError::WrongSigner {
                signer: format!("contributor:{c}"),
                action,
                allowed: "the organiser",
            }),
        };
        let self_or_organiser = |contributor: &str, action| match &req.signer {
            Signer::Organiser => Ok(()),
            Signer::Contributor(c) if c == contributor => Ok(()),
            Signer::Contributor(c) => Err(LedgerError::WrongSigner {
                signer: format!("contributor:{c}"),
                action,
                allowed: "the contributor itself or the organiser",
            }),
        };
        match &req.op {
            Operation::Sale { .. } => organiser_only("record a sale"),
            Operation::Fund { .. } => organiser_only("fund a run"),
            Operation::Payout { .. } => organiser_only("pay a round"),
            Operation::Slash { .. } => organiser_only("slash stake"),
            Operation::Revenue { .. } => organiser_only("record revenue"),
            Operation::CloseEpoch { .. } => organiser_only("close an epoch"),
            Operation::Stake { contributor, .. } => self_or_organiser(contributor, "stake"),
            Operation::Unbond { contributor, .. } => self_or_organiser(contributor, "unbond"),
            Operation::Release { contributor, .. } => {
                self_or_organiser(contributor, "release stake")
            }
        }
    }

    fn known_run(&self, run: &str) -> Result<&RunInfo, LedgerError> {
        check_id(run)?;
        self.runs.get(run).ok_or_else(|| LedgerError::UnknownRun {
            run: run.to_string(),
        })
    }

    /// Validates `req` at time `now_ms` and computes everything it would change.
    pub fn plan(&self, req: &Request, now_ms: u64) -> Result<Planned, LedgerError> {
        check_request_id(&req.id)?;
        let content_hash = req.content_hash();
        if let Some((hash, receipt)) = self.requests.get(&req.id) {
            return if *hash == content_hash {
                Ok(Planned::Replay(receipt.clone()))
            } else {
                Err(LedgerError::DuplicateId { id: req.id.clone() })
            };
        }
        if let Signer::Contributor(c) = &req.signer {
            check_id(c)?;
        }
        self.authorize(req)?;
        let mut b = Builder {
            state: self,
            request: &req.id,
            overlay: BTreeMap::new(),
            transfers: Vec::new(),
            issued_delta: 0,
            run: None,
            round: None,
            model: None,
        };
        let mut aux = Vec::new();
        let mut root = None;
        let contributor = |id: &str| -> Result<Account, LedgerError> {
            check_id(id)?;
            Ok(Account::Contributor(id.to_string()))
        };
        match &req.op {
            Operation::Sale {
                buyer,
                tokens,
                treasury_tokens,
                proceeds,
            } => {
                let buyer = contributor(buyer)?;
                if tokens.0 == 0 && treasury_tokens.0 == 0 {
                    return Err(LedgerError::BadAmount {
                        reason: "a sale must issue some tokens".into(),
                    });
                }
                if proceeds.len() > 256 {
                    return Err(LedgerError::BadAmount {
                        reason: "proceeds note is over 256 bytes".into(),
                    });
                }
                b.move_(TransferKind::Sale, Account::Issuance, buyer, tokens.0)?;
                b.move_(
                    TransferKind::TreasuryAllocation,
                    Account::Issuance,
                    Account::Treasury,
                    treasury_tokens.0,
                )?;
            }
            Operation::Fund {
                run,
                model,
                amount,
                reward_per_round,
            } => {
                check_id(run)?;
                check_id(model)?;
                let amount = positive(*amount, "the funding amount")?;
                let reward = positive(*reward_per_round, "the reward per round")?;
                if let Some(info) = self.runs.get(run) {
                    if info.model != *model {
                        return Err(LedgerError::ModelChange {
                            run: run.clone(),
                            model: info.model.clone(),
                        });
                    }
                }
                b.run = Some(run.clone());
                b.model = Some(model.clone());
                b.move_(
                    TransferKind::Fund,
                    Account::Treasury,
                    Account::Pool(run.clone()),
                    amount,
                )?;
                aux.push(Aux::Run {
                    run: run.clone(),
                    model: model.clone(),
                    reward_per_round: reward,
                });
            }
            Operation::Payout { run, round, work } => {
                let info = self.known_run(run)?;
                if let Some(by) = info.paid.get(round) {
                    return Err(LedgerError::AlreadyPaid {
                        run: run.clone(),
                        round: *round,
                        request: by.clone(),
                    });
                }
                if work.is_empty() || work.len() > PAYOUT_ENTRIES_MAX {
                    return Err(LedgerError::BadWork {
                        reason: format!(
                            "{} entries; 1 to {PAYOUT_ENTRIES_MAX} expected",
                            work.len()
                        ),
                    });
                }
                let mut entries: Vec<(String, u128)> = Vec::with_capacity(work.len());
                for w in work {
                    check_id(&w.contributor)?;
                    if w.tokens > WORK_TOKENS_MAX {
                        return Err(LedgerError::BadWork {
                            reason: format!(
                                "{} claims {} tokens, over {WORK_TOKENS_MAX}",
                                w.contributor, w.tokens
                            ),
                        });
                    }
                    let weight = w.tokens as u128 * fraction(w.score_ppm, "score")?;
                    entries.push((w.contributor.clone(), weight));
                }
                entries.sort();
                if let Some(pair) = entries.windows(2).find(|p| p[0].0 == p[1].0) {
                    return Err(LedgerError::BadWork {
                        reason: format!("{} is listed twice", pair[0].0),
                    });
                }
                let pool = Account::Pool(run.clone());
                let reward = info.reward_per_round.min(b.require(&pool)?);
                if reward == 0 {
                    return Err(LedgerError::PoolEmpty { run: run.clone() });
                }
                let weights: Vec<u128> = entries.iter().map(|e| e.1).collect();
                let parts = split(reward, &weights).ok_or_else(|| LedgerError::BadWork {
                    reason: "no verified work to pay".into(),
                })?;
                b.run = Some(run.clone());
                b.round = Some(*round);
                b.model = Some(info.model.clone());
                for ((c, _), part) in entries.iter().zip(parts) {
                    b.move_(
                        TransferKind::Payout,
                        pool.clone(),
                        Account::Contributor(c.clone()),
                        part,
                    )?;
                }
                aux.push(Aux::Paid {
                    run: run.clone(),
                    round: *round,
                    request: req.id.clone(),
                });
                aux.push(Aux::Shares {
                    model: info.model.clone(),
                    work: entries,
                });
            }
            Operation::Stake {
                run,
                contributor: c,
                amount,
            } => {
                self.known_run(run)?;
                let from = contributor(c)?;
                let amount = positive(*amount, "the stake")?;
                b.run = Some(run.clone());
                b.move_(
                    TransferKind::Stake,
                    from,
                    Account::Stake {
                        run: run.clone(),
                        contributor: c.clone(),
                    },
                    amount,
                )?;
            }
            Operation::Unbond {
                run,
                contributor: c,
                amount,
            } => {
                self.known_run(run)?;
                contributor(c)?;
                let amount = positive(*amount, "the unbonded amount")?;
                let key = (run.clone(), c.clone());
                if self.unbonding.get(&key).map_or(0, Vec::len) >= UNBONDING_ENTRIES_MAX {
                    return Err(LedgerError::TooManyUnbonding {
                        run: run.clone(),
                        contributor: c.clone(),
                        max: UNBONDING_ENTRIES_MAX,
                    });
                }
                b.run = Some(run.clone());
                let stake = Account::Stake {
                    run: run.clone(),
                    contributor: c.clone(),
                };
                let unbonding = Account::Unbonding {
                    run: run.clone(),
                    contributor: c.clone(),
                };
                b.move_(TransferKind::Unbond, stake, unbonding, amount)?;
                let release_at_ms = now_ms.saturating_add(self.config.unbond_delay_ms);
                aux.push(Aux::UnbondingAdd {
                    key: (run.clone(), c.clone()),
                    amount,
                    release_at_ms,
                });
            }
            Operation::Release {
                run,
                contributor: c,
            } => {
                self.known_run(run)?;
                let to = contributor(c)?;
                let key = (run.clone(), c.clone());
                let pending = self.unbonding.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                let matured: u128 = pending.iter().filter(|p| p.1 <= now_ms).map(|p| p.0).sum();
                if matured == 0 {
                    return Err(LedgerError::NotMatured {
                        run: run.clone(),
                        contributor: c.clone(),
                        next_release_ms: pending.iter().map(|p| p.1).min(),
                    });
                }
                b.run = Some(run.clone());
                let unbonding = Account::Unbonding {
                    run: run.clone(),
                    contributor: c.clone(),
                };
                b.move_(TransferKind::Release, unbonding, to, matured)?;
                aux.push(Aux::UnbondingTake { key, now_ms });
            }
            Operation::Slash {
                run,
                contributor: c,
                fraction_ppm,
                reason,
            } => {
                self.known_run(run)?;
                contributor(c)?;
                let ppm = fraction(*fraction_ppm, "the slashed fraction")?;
                if reason.is_empty() || reason.len() > 256 {
                    return Err(LedgerError::BadAmount {
                        reason: "a slash needs a reason of 1-256 bytes".into(),
                    });
                }
                let stake = Account::Stake {
                    run: run.clone(),
                    contributor: c.clone(),
                };
                let held = b.require(&stake)?;
                let amount = crate::split::mul_div(held, ppm, PPM as u128).0;
                if amount == 0 {
                    return Err(LedgerError::BadAmount {
                        reason: format!("{stake} holds nothing to slash"),
                    });
                }
                let to = match self.config.slash_to {
                    SlashTo::Burned => Account::Burned,
                    SlashTo::Treasury => Account::Treasury,
                };
                b.run = Some(run.clone());
                b.move_(TransferKind::Slash, stake, to, amount)?;
            }
            Operation::Revenue {
                model,
                payer,
                amount,
                reinvest_ppm,
            } => {
                check_id(model)?;
                let payer = contributor(payer)?;
                let amount = positive(*amount, "the revenue")?;
                let ppm = fraction(*reinvest_ppm, "the reinvested fraction")?;
                let shares = self
                    .shares
                    .get(model)
                    .filter(|s| s.values().any(|&w| w > 0))
                    .ok_or_else(|| LedgerError::UnknownModel {
                        model: model.clone(),
                    })?;
                let reinvest = crate::split::mul_div(amount, ppm, PPM as u128).0;
                let to_split = amount - reinvest;
                let weights: Vec<u128> = shares.values().copied().collect();
                let parts = split(to_split, &weights).expect("shares have positive weight");
                b.model = Some(model.clone());
                b.move_(
                    TransferKind::Reinvest,
                    payer.clone(),
                    Account::Treasury,
                    reinvest,
                )?;
                for (c, part) in shares.keys().zip(parts) {
                    b.move_(
                        TransferKind::Revenue,
                        payer.clone(),
                        Account::Contributor(c.clone()),
                        part,
                    )?;
                }
            }
            Operation::CloseEpoch { epoch } => {
                if let Some((&last, _)) = self.epochs.last_key_value() {
                    if *epoch <= last {
                        return Err(LedgerError::EpochOrder {
                            epoch: *epoch,
                            last,
                        });
                    }
                }
                let r = self.root();
                aux.push(Aux::Epoch {
                    epoch: *epoch,
                    root: r.clone(),
                });
                root = Some(r);
            }
        }
        let Builder {
            overlay,
            transfers,
            issued_delta,
            ..
        } = b;
        Ok(Planned::New(Box::new(Plan {
            request: req.clone(),
            content_hash,
            receipt: Receipt {
                request: req.id.clone(),
                transfers,
                root,
            },
            balances: overlay.into_iter().collect(),
            issued_delta,
            aux,
        })))
    }

    /// Applies a plan made against this exact state.
    pub fn commit(&mut self, plan: Plan) {
        for (a, b) in &plan.balances {
            self.balances.insert(a.clone(), *b);
        }
        self.issued += plan.issued_delta;
        for aux in plan.aux {
            match aux {
                Aux::Run {
                    run,
                    model,
                    reward_per_round,
                } => {
                    let info = self.runs.entry(run).or_default();
                    info.model = model;
                    info.reward_per_round = reward_per_round;
                }
                Aux::Paid {
                    run,
                    round,
                    request,
                } => {
                    self.runs
                        .get_mut(&run)
                        .expect("planned against a known run")
                        .paid
                        .insert(round, request);
                }
                Aux::Shares { model, work } => {
                    let shares = self.shares.entry(model).or_default();
                    for (c, w) in work {
                        *shares.entry(c).or_insert(0) += w;
                    }
                }
                Aux::UnbondingAdd {
                    key,
                    amount,
                    release_at_ms,
                } => {
                    self.unbonding
                        .entry(key)
                        .or_default()
                        .push((amount, release_at_ms));
                }
                Aux::UnbondingTake { key, now_ms } => {
                    if let Some(list) = self.unbonding.get_mut(&key) {
                        list.retain(|p| p.1 > now_ms);
                    }
                }
                Aux::Epoch { epoch, root } => {
                    self.epochs.insert(epoch, root);
                }
            }
        }
        self.requests
            .insert(plan.request.id.clone(), (plan.content_hash, plan.receipt));
        self.assert_invariants();
    }

    /// Plans and commits in one step (the in-memory path; stores persist in between).
    pub fn apply(&mut self, req: &Request, now_ms: u64) -> Result<Receipt, LedgerError> {
        match self.plan(req, now_ms)? {
            Planned::Replay(r) => Ok(r),
            Planned::New(plan) => {
                let receipt = plan.receipt.clone();
                self.commit(*plan);
                Ok(receipt)
            }
        }
    }

    /// Every balance but issuance's adds up to what was issued, and the supply is
    /// issued minus burned. A violation is a bug in this module, so it panics.
    pub fn assert_invariants(&self) {
        let total = self
            .balances
            .values()
            .try_fold(0u128, |acc, b| acc.checked_add(*b))
            .expect("balances overflow");
        assert_eq!(
            total, self.issued,
            "balances do not add up to issued tokens"
        );
        let circulating = total - self.burned();
        assert_eq!(
            circulating,
            self.supply(),
            "supply is not issued minus burned"
        );
        assert!(
            !self.balances.contains_key(&Account::Issuance),
            "issuance holds a positive balance"
        );
        for (key, pending) in &self.unbonding {
            let sum: u128 = pending.iter().map(|p| p.0).sum();
            let held = self
                .balances
                .get(&Account::Unbonding {
                    run: key.0.clone(),
                    contributor: key.1.clone(),
                })
                .copied()
                .unwrap_or(0);
            assert_eq!(
                sum, held,
                "unbonding entries of {key:?} differ from the account's balance"
            );
        }
    }

    /// Runs that exist, for listing.
    pub fn runs(&self) -> impl Iterator<Item = (&String, &RunInfo)> {
        self.runs.iter()
    }

    /// Contributors with a share of `model`'s work, in account order.
    pub fn contributors_of(&self, model: &str) -> BTreeSet<String> {
        self.shares
            .get(model)
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default()
    }
}
