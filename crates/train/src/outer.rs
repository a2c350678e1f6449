//! The outer loop (codecs, aggregators, the Nesterov step, the θ hash) lives in the
//! `tessera_outer` crate; this re-export keeps `tessera_train::outer::*` paths working.

pub use tessera_outer::*;
