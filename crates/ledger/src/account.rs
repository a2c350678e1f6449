//! Accounts and their canonical names (`treasury`, `pool:RUN`, `contributor:ID`,
//! `stake:RUN:ID`, `unbonding:RUN:ID`, `issuance`, `burned`). The name is the
//! account's identity everywhere: in SQLite, in JSON, and in Merkle leaves.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest run, model or contributor identifier.
pub const ID_BYTES_MAX: usize = 64;

/// A ledger account. The derived order (variant, then identifiers) fixes the Merkle
/// leaf order; it compares without allocating, which matters on hot paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    /// Where tokens come from; the only account whose balance is negative (−issued).
    Issuance,
    Treasury,
    Burned,
    /// A run's reward pool.
    Pool(String),
    Contributor(String),
    /// Tokens a contributor has staked to join a run.
    Stake {
        run: String,
        contributor: String,
    },
    /// Stake on its way back to a contributor, released after the unbonding delay.
    Unbonding {
        run: String,
        contributor: String,
    },
}

/// Why a string is not an account name or an identifier.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("bad account `{text}`: {reason}")]
pub struct AccountError {
    pub text: String,
    pub reason: String,
}

/// Checks a run, model or contributor identifier: 1-64 bytes of `[A-Za-z0-9_.-]`.
pub fn check_id(id: &str) -> Result<(), AccountError> {
    let ok = !id.is_empty()
        && id.len() <= ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AccountError {
            text: id.to_string(),
            reason: format!("identifiers are 1-{ID_BYTES_MAX} characters of A-Z a-z 0-9 _ . -"),
        })
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Issuance => write!(f, "issuance"),
            Account::Treasury => write!(f, "treasury"),
            Account::Burned => write!(f, "burned"),
            Account::Pool(run) => write!(f, "pool:{run}"),
            Account::Contributor(id) => write!(f, "contributor:{id}"),
            Account::Stake { run, contributor } => write!(f, "stake:{run}:{contributor}"),
            Account::Unbonding { run, contributor } => write!(f, "unbonding:{run}:{contributor}"),
        }
    }
}

impl FromStr for Account {
    type Err = AccountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = |reason: &str| AccountError {
            text: s.to_string(),
            reason: reason.to_string(),
        };
        let account = match parts.as_slice() {
            ["issuance"] => Account::Issuance,
            ["treasury"] => Account::Treasury,
            ["burned"] => Account::Burned,
            ["pool", run] => Account::Pool(run.to_string()),
            ["contributor", id] => Account::Contributor(id.to_string()),
            ["stake", run, c] => Account::Stake { run: run.to_string(), contributor: c.to_string() },
            ["unbonding", run, c] => Account::Unbonding { run: run.to_string(), contributor: c.to_string() },
            _ => {
                return Err(bad(
                    "expected issuance, treasury, burned, pool:RUN, contributor:ID, stake:RUN:ID or unbonding:RUN:ID",
                ))
            }
        };
        for id in &parts[1..] {
            check_id(id).map_err(|e| bad(&e.reason))?;
        }
        Ok(account)
    }
}

impl Serialize for Account {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for name in [
            "issuance",
            "treasury",
            "burned",
            "pool:run-1",
            "contributor:ab12",
            "stake:r:c",
            "unbonding:r.2:c_3",
        ] {
            let a: Account = name.parse().unwrap();
            assert_eq!(a.to_string(), name);
        }
        for bad in [
            "",
            "pool",
            "pool:",
            "contributor:a:b",
            "stake:r",
            "bank:x",
            "contributor:é",
            "pool:a b",
        ] {
            assert!(bad.parse::<Account>().is_err(), "{bad}");
        }
    }
}
