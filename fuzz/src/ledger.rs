//! Ledger request bodies as the ledger's HTTP API takes them (`POST /ledger/requests`),
//! then the ledger's own rules on what parsed, and account names from URL paths.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tessera_ledger::amount::Amount;
use tessera_ledger::state::Operation;
use tessera_ledger::{Account, LedgerConfig, Request, Signer, State, Work};

/// `tessera_net::ledger_api::RequestBody`, field for field: the net crate links tokio
/// and axum, so the body is declared again here rather than imported. A change there
/// must be made here too.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestBody {
    pub id: String,
    #[serde(flatten)]
    pub op: Operation,
}

/// The contributor the target's ledger knows (stake, an unbonding, a payout).
pub const CONTRIBUTOR: &str = "alice";
pub const RUN: &str = "run-1";
pub const MODEL: &str = "model-1";
/// When the setup's requests were made; the fuzzed request comes eight days later,
/// after the unbonding delay.
const SETUP_MS: u64 = 1_800_000_000_000;
pub const NOW_MS: u64 = SETUP_MS + 8 * 24 * 3600 * 1000;

fn tokens(n: u128) -> Amount {
    Amount(n * tessera_ledger::BASE_UNITS_PER_TOKEN)
}

/// The requests that give the target's ledger a treasury, a funded run, a stake, a
/// paid round and a matured unbonding, so that every operation has something to act on.
pub fn setup_requests() -> Vec<Request> {
    let organiser = |id: &str, op| Request {
        id: id.into(),
        signer: Signer::Organiser,
        op,
    };
    vec![
        organiser(
            "setup-sale",
            Operation::Sale {
                buyer: CONTRIBUTOR.into(),
                tokens: tokens(1_000),
                treasury_tokens: tokens(1_000),
                proceeds: "1000 USD".into(),
            },
        ),
        organiser(
            "setup-fund",
            Operation::Fund {
                run: RUN.into(),
                model: MODEL.into(),
                amount: tokens(100),
                reward_per_round: tokens(10),
            },
        ),
        Request {
            id: "setup-stake".into(),
            signer: Signer::Contributor(CONTRIBUTOR.into()),
            op: Operation::Stake {
                run: RUN.into(),
                contributor: CONTRIBUTOR.into(),
                amount: tokens(50),
            },
        },
        organiser(
            "setup-payout",
            Operation::Payout {
                run: RUN.into(),
                round: 0,
                work: vec![Work {
                    contributor: CONTRIBUTOR.into(),
                    tokens: 1_000,
                    score_ppm: 1_000_000,
                }],
            },
        ),
        organiser(
            "setup-unbond",
            Operation::Unbond {
                run: RUN.into(),
                contributor: CONTRIBUTOR.into(),
                amount: tokens(10),
            },
        ),
    ]
}

fn setup() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut state = State::new(LedgerConfig::default());
        for req in setup_requests() {
            state.apply(&req, SETUP_MS).expect("setup request applies");
        }
        state
    })
}

/// A request body from the wire, signed by the organiser or by the contributor, through
/// the ledger's rules; and the bytes as an account name and as amounts.
pub fn request(data: &[u8]) {
    if let Some(text) = crate::text(data) {
        names(text);
    }
    // `serde_json::from_slice`, as the handler parses the body.
    let Ok(body) = serde_json::from_slice::<RequestBody>(data) else {
        return;
    };
    for signer in [Signer::Organiser, Signer::Contributor(CONTRIBUTOR.into())] {
        let req = Request {
            id: body.id.clone(),
            signer,
            op: body.op.clone(),
        };
        let mut state = setup().clone();
        // `apply` plans, commits and asserts the ledger's invariants (in release too).
        let Ok(receipt) = state.apply(&req, NOW_MS) else {
            continue;
        };
        // The store journals the request as JSON and replays it on open: the journal
        // entry must decode to the same request and replay to the same receipt.
        let journal = serde_json::to_string(&req).expect("a request serialises");
        let replayed: Request = serde_json::from_str(&journal).expect("journal entry decodes");
        assert_eq!(replayed, req, "journal entry decodes to another request");
        let mut fresh = setup().clone();
        assert_eq!(fresh.apply(&replayed, NOW_MS).as_ref(), Ok(&receipt));
        // Re-submitting the same request is a no-op returning the same receipt.
        let root = state.root();
        let count = state.request_count();
        assert_eq!(state.apply(&req, NOW_MS).as_ref(), Ok(&receipt));
        assert_eq!((state.root(), state.request_count()), (root, count));
    }
}

/// Account names (`GET /ledger/balance/{account}`) have one spelling; amounts parse to
/// values that print and parse back.
fn names(text: &str) {
    if let Ok(account) = text.parse::<Account>() {
        assert_eq!(account.to_string(), text, "an account has another spelling");
    }
    if let Ok(amount) = Amount::parse_tokens(text) {
        assert_eq!(Amount::parse_tokens(&amount.tokens_string()), Ok(amount));
    }
    if let Ok(amount) = Amount::parse_base_units(text) {
        assert_eq!(amount.to_string().parse::<Amount>(), Ok(amount));
    }
}
