//! The engine with its store: the one place that applies an input, makes its change
//! durable, and rebuilds the engine from the store when either fails (fail-stop). The
//! hub process and the simulator both drive the engine through a [`Host`], so the
//! simulator exercises the crash path the real hub runs.

use crate::engine::{Applied, HubError, HubInput, HubState, OuterStep};
use crate::store::{HubStore, StoreError};
use tessera_protocol::ErrorCode;

/// Why a host could not be opened or rebuilt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store holds a run with other settings; use a new state directory")]
    OtherRun,
    #[error("the store cannot be restored: {0}")]
    Restore(String),
}

/// An engine and the store it persists to.
pub struct Host<S: HubStore> {
    /// The engine as the run starts, to rebuild from the store.
    fresh: HubState,
    identity: String,
    pub state: HubState,
    pub store: S,
    /// How many times the engine was rebuilt after a failure.
    pub recoveries: u64,
}

impl<S: HubStore> Host<S> {
    /// Opens the run in `store`: creates it from `fresh` when the store is empty,
    /// otherwise restores it (refusing a store that holds another run). `identity`
    /// names the run's settings.
    pub fn open(
        fresh: HubState,
        identity: String,
        mut store: S,
        now_ms: u64,
    ) -> Result<Host<S>, HostError> {
        let state = match store.load()? {
            Some((stored, durable)) => {
                if stored != identity {
                    return Err(HostError::OtherRun);
                }
                fresh
                    .clone()
                    .restore(durable, now_ms)
                    .map_err(HostError::Restore)?
            }
            None => {
                store.create(&identity, &fresh.initial_change())?;
                fresh.clone()
            }
        };
        Ok(Host {
            fresh,
            identity,
            state,
            store,
            recoveries: 0,
        })
    }

    /// Applies an input and makes its change durable. On a failed outer step or write
    /// the engine is rebuilt from the store, where the input never happened, and the
    /// error is returned; a rebuild that fails is returned as `Err(Err(..))`.
    pub fn input(
        &mut self,
        input: HubInput,
        now_ms: u64,
        outer: &mut dyn OuterStep,
    ) -> Result<Applied, Result<HubError, HostError>> {
        let applied = match self.state.apply(input, now_ms, outer) {
            Ok(a) => a,
            Err(e) if e.code == ErrorCode::Internal => {
                self.recover(now_ms).map_err(Err)?;
                return Err(Ok(e));
            }
            Err(e) => return Err(Ok(e)),
        };
        // An input that changed nothing durable (a heartbeat) needs no disk, so it is
        // served even when the disk is full.
        if applied.change.is_empty() {
            return Ok(applied);
        }
        if let Err(e) = self.store.write(&applied.change) {
            let e = HubError::new(ErrorCode::Internal, format!("persisting: {e}"));
            self.recover(now_ms).map_err(Err)?;
            return Err(Ok(e));
        }
        Ok(applied)
    }

    /// Rebuilds the engine from the store, as a restart would.
    pub fn recover(&mut self, now_ms: u64) -> Result<(), HostError> {
        let (stored, durable) = self.store.load()?.ok_or(StoreError::Missing)?;
        if stored != self.identity {
            return Err(HostError::OtherRun);
        }
        self.state = self
            .fresh
            .clone()
            .restore(durable, now_ms)
            .map_err(HostError::Restore)?;
        self.recoveries += 1;
        Ok(())
    }
}
