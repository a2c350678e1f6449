//! The data owner's key server: it holds a sealed data set's item keys and releases
//! them only to nodes that prove, with a fresh hardware quote, that they run an
//! allow-listed build in a TEE.
//!
//! One release:
//!
//! 1. `POST /v1/nonce` → a fresh 32-byte nonce, valid [`NONCE_TTL_SECS`], used once.
//! 2. The node makes an ephemeral X25519 key pair inside its TEE and asks its quote
//!    provider for a quote whose report_data is [`tessera_attest::binding::report_data`]
//!    over its node key, that HPKE key, the nonce and the run id.
//! 3. `POST /v1/release` with the quote, its collateral, the items wanted and an ed25519
//!    signature by the node key over [`request_signing_bytes`]. The server takes the
//!    nonce out of its table first (so a nonce is spent whatever happens next), checks
//!    the signature, verifies the quote under the run's policy at the current time,
//!    checks the binding, journals each released item (durably, before answering), and
//!    answers the keys HPKE-sealed (X25519-HKDF-SHA256, HKDF-SHA256, ChaCha20-Poly1305;
//!    info = [`RELEASE_INFO_TAG`] ‖ run id, aad = nonce) to the attested HPKE key.
//!
//! Only the TEE that generated the HPKE key can open the answer; the node key in the
//! binding ties the release to one member of the run; the nonce to one session.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use tessera_attest::{Evidence, Policy};

pub const NONCE_TTL_SECS: u64 = 120;
/// Outstanding nonces; past this, nonce requests are refused until some expire.
pub const NONCES_MAX: usize = 4096;
/// Outstanding nonces per requesting address: one address cannot take the whole table
/// and lock every node out (it could: 4,092 nonces in 2 s from one loop).
pub const NONCES_PER_ADDRESS_MAX: usize = 16;
/// The largest request body (a quote with its collateral is ~25 KiB).
pub const BODY_MAX: usize = 512 * 1024;
/// The largest number of items one request may name.
pub const ITEMS_MAX: usize = 65_536;
pub const REQUEST_TAG: &[u8] = b"tessera-keys-request-v1\0";
pub const RELEASE_INFO_TAG: &[u8] = b"tessera-keys-v1\0";

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonceReply {
    pub nonce: String,
    pub expires_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub run_id: String,
    /// The node's ed25519 public key (hex).
    pub node_key: String,
    /// The ephemeral X25519 public key the answer is sealed to (hex).
    pub hpke_key: String,
    pub nonce: String,
    pub items: Vec<u32>,
    pub evidence: Evidence,
    /// ed25519 by `node_key` over [`request_signing_bytes`] (hex).
    pub signature: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseReply {
    /// HPKE encapsulated key (hex).
    pub enc: String,
    /// The sealed [`ReleasedKeys`] JSON (hex).
    pub ciphertext: String,
    pub quote_hash: String,
}

/// What the HPKE ciphertext holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedKeys {
    pub dataset_id: String,
    pub manifest_id: String,
    pub keys: Vec<ItemKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemKey {
    pub index: u32,
    pub key: String,
}

/// The bytes a node signs: tag, run id (u16 LE length + bytes), nonce, HPKE key,
/// blake3 of the quote, the item count (u32 LE) and each item (u32 LE).
pub fn request_signing_bytes(
    run_id: &str,
    nonce: &[u8; 32],
    hpke_key: &[u8; 32],
    quote: &[u8],
    items: &[u32],
) -> Vec<u8> {
    let run = run_id.as_bytes();
    let len = u16::try_from(run.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(REQUEST_TAG.len() + 110 + run.len() + 4 * items.len());
    out.extend_from_slice(REQUEST_TAG);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&run[..len as usize]);
    out.extend_from_slice(nonce);
    out.extend_from_slice(hpke_key);
    out.extend_from_slice(blake3::hash(quote).as_bytes());
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for i in items {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out
}

/// A refused request: an HTTP status, the rule that failed, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("key release refused ({rule}): {message}")]
pub struct Refused {
    pub status: u16,
    pub rule: String,
    pub message: String,
}

impl Refused {
    fn new(status: u16, rule: &str, message: impl Into<String>) -> Refused {
        Refused {
            status,
            rule: rule.to_string(),
            message: message.into(),
        }
    }
}

fn hex32(field: &str, s: &str) -> Result<[u8; 32], Refused> {
    hex::decode(s)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            Refused::new(
                400,
                "malformed",
                format!("`{field}` is not 32 bytes of hex"),
            )
        })
}

/// One journaled release or refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub at: u64,
    pub run_id: String,
    pub node_key: String,
    /// The item released; `None` for a refusal.
    pub item: Option<u32>,
    pub quote_hash: String,
    pub tee: String,
    /// `released`, or the rule that refused.
    pub outcome: String,
    pub message: String,
}

/// The journal: an SQLite file (WAL, synchronous=FULL), one row per released item and
/// one per refusal.
pub struct Journal {
    conn: rusqlite::Connection,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal> {
        let conn = rusqlite::Connection::open(path)
            .with_context(|| format!("opening key journal {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS journal (
               id INTEGER PRIMARY KEY, at INTEGER NOT NULL, run_id TEXT NOT NULL,
               node_key TEXT NOT NULL, item INTEGER, quote_hash TEXT NOT NULL,
               tee TEXT NOT NULL, outcome TEXT NOT NULL, message TEXT NOT NULL);",
        )
        .with_context(|| format!("initialising key journal {}", path.display()))?;
        Ok(Journal { conn })
    }

    pub fn append(&mut self, entries: &[JournalEntry]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for e in entries {
            tx.execute(
                "INSERT INTO journal (at, run_id, node_key, item, quote_hash, tee, outcome, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![
                    e.at as i64,
                    e.run_id,
                    e.node_key,
                    e.item.map(|i| i as i64),
                    e.quote_hash,
                    e.tee,
                    e.outcome,
                    e.message
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn entries(&self) -> Result<Vec<JournalEntry>> {
        let mut st = self.conn.prepare(
            "SELECT at, run_id, node_key, item, quote_hash, tee, outcome, message FROM journal ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(JournalEntry {
                at: r.get::<_, i64>(0)? as u64,
                run_id: r.get(1)?,
                node_key: r.get(2)?,
                item: r.get::<_, Option<i64>>(3)?.map(|i| i as u32),
                quote_hash: r.get(4)?,
                tee: r.get(5)?,
                outcome: r.get(6)?,
                message: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// The key server's state.
pub struct KeyServer {
    run_id: String,
    policy: Policy,
    keys: tessera_seal::SealKeys,
    /// Outstanding nonces: expiry and the address that asked.
    nonces: Mutex<HashMap<[u8; 32], (u64, std::net::IpAddr)>>,
    /// Requests refused before a nonce was spent (unknown, used or expired nonce):
    /// counted, not journaled, so that nobody can grow the journal without a nonce.
    unjournaled_refusals: std::sync::atomic::AtomicU64,
    journal: Mutex<Journal>,
}

impl KeyServer {
    pub fn new(
        run_id: String,
        policy: Policy,
        keys: tessera_seal::SealKeys,
        journal: &Path,
    ) -> Result<KeyServer> {
        policy.validate()?;
        Ok(KeyServer {
            run_id,
            policy,
            keys,
            nonces: Mutex::new(HashMap::new()),
            unjournaled_refusals: Default::default(),
            journal: Mutex::new(Journal::open(journal)?),
        })
    }

    pub fn journal_entries(&self) -> Result<Vec<JournalEntry>> {
        self.journal.lock().expect("journal lock").entries()
    }

    /// Requests refused for their nonce before anything was checked (not journaled).
    pub fn unjournaled_refusals(&self) -> u64 {
        self.unjournaled_refusals
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A fresh nonce for `from`, valid for [`NONCE_TTL_SECS`]; at most
    /// [`NONCES_PER_ADDRESS_MAX`] outstanding per address and [`NONCES_MAX`] in all.
    pub fn issue_nonce(&self, now: u64, from: std::net::IpAddr) -> Result<NonceReply, Refused> {
        let mut nonces = self.nonces.lock().expect("nonce lock");
        nonces.retain(|_, (exp, _)| *exp >= now);
        if nonces.values().filter(|(_, ip)| *ip == from).count() >= NONCES_PER_ADDRESS_MAX {
            return Err(Refused::new(
                429,
                "busy",
                format!(
                    "{NONCES_PER_ADDRESS_MAX} nonces are outstanding for this address; use one or wait {NONCE_TTL_SECS} s"
                ),
            ));
        }
        if nonces.len() >= NONCES_MAX {
            return Err(Refused::new(
                429,
                "busy",
                format!("{NONCES_MAX} nonces are outstanding; retry in a minute"),
            ));
        }
        let mut nonce = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let expires = now + NONCE_TTL_SECS;
        nonces.insert(nonce, (expires, from));
        Ok(NonceReply {
            nonce: hex::encode(nonce),
            expires_unix: expires,
        })
    }

    /// Checks a request and, if every check passes, releases the keys sealed to the
    /// attested HPKE key. Refusals are journaled too.
    pub fn release(&self, req: &ReleaseRequest, now: u64) -> Result<ReleaseReply, Refused> {
        let quote_hash = req.evidence.quote_hash();
        let result = self.check_and_seal(req, now, &quote_hash);
        if matches!(&result, Err(r) if r.rule == "nonce") {
            self.unjournaled_refusals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return result;
        }
        let entries: Vec<JournalEntry> = match &result {
            Ok(_) => req
                .items
                .iter()
                .map(|&i| JournalEntry {
                    at: now,
                    run_id: req.run_id.clone(),
                    node_key: req.node_key.clone(),
                    item: Some(i),
                    quote_hash: quote_hash.clone(),
                    tee: req.evidence.tee().to_string(),
                    outcome: "released".into(),
                    message: String::new(),
                })
                .collect(),
            Err(r) => vec![JournalEntry {
                at: now,
                run_id: req.run_id.chars().take(128).collect(),
                node_key: req.node_key.chars().take(64).collect(),
                item: None,
                quote_hash: quote_hash.clone(),
                tee: req.evidence.tee().to_string(),
                outcome: r.rule.clone(),
                message: r.message.chars().take(512).collect(),
            }],
        };
        // A release is answered only once it is on disk.
        self.journal
            .lock()
            .expect("journal lock")
            .append(&entries)
            .map_err(|e| {
                Refused::new(
                    500,
                    "journal",
                    format!("the journal could not be written: {e}"),
                )
            })?;
        result
    }

    fn check_and_seal(
        &self,
        req: &ReleaseRequest,
        now: u64,
        quote_hash: &str,
    ) -> Result<ReleaseReply, Refused> {
        let nonce = hex32("nonce", &req.nonce)?;
        // Spent first: whatever happens below, this nonce never serves again.
        let expires = self
            .nonces
            .lock()
            .expect("nonce lock")
            .remove(&nonce)
            .map(|(exp, _)| exp);
        match expires {
            None => {
                return Err(Refused::new(
                    409,
                    "nonce",
                    "the nonce was not issued here, or was already used",
                ))
            }
            Some(exp) if exp < now => {
                return Err(Refused::new(409, "nonce", "the nonce expired"));
            }
            Some(_) => {}
        }
        if req.run_id != self.run_id {
            return Err(Refused::new(
                403,
                "run",
                format!(
                    "this key server serves run `{}`, not `{}`",
                    self.run_id,
                    req.run_id.chars().take(64).collect::<String>()
                ),
            ));
        }
        let node_key = hex32("node_key", &req.node_key)?;
        let hpke_key = hex32("hpke_key", &req.hpke_key)?;
        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&node_key)
            .map_err(|_| Refused::new(400, "malformed", "`node_key` is not an ed25519 key"))?;
        let sig = hex::decode(&req.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| ed25519_dalek::Signature::from_bytes(&b))
            .ok_or_else(|| Refused::new(400, "malformed", "`signature` is not 64 bytes of hex"))?;
        let signed = request_signing_bytes(
            &req.run_id,
            &nonce,
            &hpke_key,
            &req.evidence.quote,
            &req.items,
        );
        verifying.verify_strict(&signed, &sig).map_err(|_| {
            Refused::new(403, "signature", "the request is not signed by `node_key`")
        })?;
        let items = self.check_items(&req.items)?;
        let expected =
            tessera_attest::binding::report_data(&node_key, &hpke_key, &nonce, &req.run_id);
        let verdict = tessera_attest::appraise(&req.evidence, now, &self.policy, &expected)
            .map_err(|r| Refused::new(403, r.rule(), r.to_string()))?;
        debug_assert_eq!(verdict.quote_hash, quote_hash);
        let released = ReleasedKeys {
            dataset_id: hex::encode(self.keys.dataset_id),
            manifest_id: hex::encode(self.keys.manifest_id),
            keys: items,
        };
        let plaintext = serde_json::to_vec(&released).expect("keys serialise");
        let (enc, ciphertext) = seal_to(&hpke_key, &info(&req.run_id), &plaintext, &nonce)
            .map_err(|e| Refused::new(400, "hpke_key", e.to_string()))?;
        Ok(ReleaseReply {
            enc: hex::encode(enc),
            ciphertext: hex::encode(ciphertext),
            quote_hash: quote_hash.to_string(),
        })
    }

    fn check_items(&self, items: &[u32]) -> Result<Vec<ItemKey>, Refused> {
        if items.is_empty() || items.len() > ITEMS_MAX {
            return Err(Refused::new(
                400,
                "items",
                format!("a request names 1 to {ITEMS_MAX} items"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        items
            .iter()
            .map(|&i| {
                if !seen.insert(i) {
                    return Err(Refused::new(
                        400,
                        "items",
                        format!("item {i} is named twice"),
                    ));
                }
                self.keys
                    .key(i)
                    .map(|k| ItemKey {
                        index: i,
                        key: hex::encode(k),
                    })
                    .ok_or_else(|| {
                        Refused::new(404, "items", format!("no item {i} in this data set"))
                    })
            })
            .collect()
    }
}

fn info(run_id: &str) -> Vec<u8> {
    [RELEASE_INFO_TAG, run_id.as_bytes()].concat()
}

fn seal_to(pk: &[u8; 32], info: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    use hpke::{Deserializable, Serializable};
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(pk)
        .map_err(|e| anyhow!("not an X25519 public key: {e:?}"))?;
    let mut rng = rand_core_09::UnwrapErr(rand_core_09::OsRng);
    let (enc, ct) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
        &hpke::OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        &mut rng,
    )
    .map_err(|e| anyhow!("HPKE seal: {e:?}"))?;
    Ok((enc.to_bytes().to_vec(), ct))
}

/// An ephemeral HPKE key pair, made where the keys will be used.
pub struct HpkeKeyPair {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl HpkeKeyPair {
    pub fn generate() -> HpkeKeyPair {
        use hpke::{Kem as _, Serializable};
        let mut ikm = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut ikm);
        let (secret, public) = Kem::derive_keypair(&ikm);
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&public.to_bytes());
        HpkeKeyPair { secret, public: pk }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn open(
        &self,
        reply: &ReleaseReply,
        run_id: &str,
        nonce: &[u8; 32],
    ) -> Result<ReleasedKeys> {
        use hpke::Deserializable;
        let enc = hex::decode(&reply.enc).context("`enc` is not hex")?;
        let ct = hex::decode(&reply.ciphertext).context("`ciphertext` is not hex")?;
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc)
            .map_err(|e| anyhow!("bad encapsulated key: {e:?}"))?;
        let pt = hpke::single_shot_open::<Aead, Kdf, Kem>(
            &hpke::OpModeR::Base,
            &self.secret,
            &enc,
            &info(run_id),
            &ct,
            nonce,
        )
        .map_err(|e| anyhow!("the released keys do not open with this HPKE key: {e:?}"))?;
        Ok(serde_json::from_slice(&pt)?)
    }
}

/// An item's index and its key, as a node holds them after a release.
pub type ItemSecret = (u32, [u8; 32]);

/// The node's side: attest through `provider` and fetch the keys of `items`.
/// Returns `(index, key)` pairs, checked to be the items asked for.
pub fn request_keys(
    url: &str,
    run_id: &str,
    identity: &tessera_protocol::Identity,
    provider: &dyn tessera_attest::provider::QuoteProvider,
    items: &[u32],
) -> Result<(ReleasedKeys, Vec<ItemSecret>)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let base = url.trim_end_matches('/');
    let nonce: NonceReply = read_reply(client.post(format!("{base}/v1/nonce")).send()?)?;
    let nonce_bytes = hex32("nonce", &nonce.nonce).map_err(|e| anyhow!("{e}"))?;
    let hpke = HpkeKeyPair::generate();
    let pk = hex32("node_key", &identity.public_hex()).map_err(|e| anyhow!("{e}"))?;
    let rd = tessera_attest::binding::report_data(&pk, &hpke.public(), &nonce_bytes, run_id);
    let evidence = provider.evidence(&rd)?;
    let signed =
        request_signing_bytes(run_id, &nonce_bytes, &hpke.public(), &evidence.quote, items);
    let req = ReleaseRequest {
        run_id: run_id.to_string(),
        node_key: hex::encode(pk),
        hpke_key: hex::encode(hpke.public()),
        nonce: nonce.nonce.clone(),
        items: items.to_vec(),
        evidence,
        signature: identity.sign(&signed),
    };
    let reply: ReleaseReply = read_reply(
        client
            .post(format!("{base}/v1/release"))
            .json(&req)
            .send()?,
    )?;
    let released = hpke.open(&reply, run_id, &nonce_bytes)?;
    let mut out = Vec::with_capacity(items.len());
    for &i in items {
        let k = released
            .keys
            .iter()
            .find(|k| k.index == i)
            .ok_or_else(|| anyhow!("the key server did not release item {i}"))?;
        let key = hex32("key", &k.key).map_err(|e| anyhow!("{e}"))?;
        out.push((i, key));
    }
    Ok((released, out))
}

fn read_reply<T: serde::de::DeserializeOwned>(resp: reqwest::blocking::Response) -> Result<T> {
    let status = resp.status();
    let body = resp.bytes()?;
    if !status.is_success() {
        if let Ok(r) = serde_json::from_slice::<Refused>(&body) {
            bail!(r);
        }
        bail!(
            "key server answered HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("key server reply is not the expected JSON")
}

/// Fetches the keys of every item of a sealed data set (attesting through `provider`)
/// and opens each item from `dir` in memory. Returns the plaintexts by item index; none
/// is ever written to disk.
pub fn open_sealed(
    dir: &Path,
    manifest: &tessera_seal::SealedManifest,
    url: &str,
    run_id: &str,
    identity: &tessera_protocol::Identity,
    provider: &dyn tessera_attest::provider::QuoteProvider,
) -> Result<Vec<Vec<u8>>> {
    let items: Vec<u32> = manifest.items.iter().map(|i| i.index).collect();
    let (released, keys) = request_keys(url, run_id, identity, provider, &items)?;
    if released.manifest_id != hex::encode(manifest.manifest_id()) {
        bail!(
            "the key server released keys for data set manifest {}, not this run's {}",
            released.manifest_id,
            hex::encode(manifest.manifest_id())
        );
    }
    keys.iter()
        .map(|(index, key)| {
            let item = &manifest.items[*index as usize];
            let path = dir.join(&item.file);
            let ct = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            tessera_seal::open_item(manifest, *index, key, &ct)
                .with_context(|| format!("opening sealed item {} ({})", index, path.display()))
        })
        .collect()
}

pub fn now_unix() -> u64 {
    tessera_attest::provider::now_unix()
}

mod http;
pub use http::{router, serve};
