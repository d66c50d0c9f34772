//! Text generation: the continuous-batching loop over a decoder graph (`llm`), and the pieces
//! that do not depend on the graph: sampling, stop sequences, and incremental detokenization
//! that only ever emits whole characters.

mod detok;
pub mod llm;
pub mod sampling;
mod stop;
