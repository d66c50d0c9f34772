//! Streamed answers: a message per piece as it decodes, then one with the finish reasons and
//! the usage, whichever API the messages are of.

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::auth::Principal;
use tokio::sync::mpsc;
use tonic::Status;

use super::response::{Api, Envelope, Message, Piece, usage};
use super::{Counts, Event, Job};
use crate::service::Inference;
use kiln_core::Result;

impl Inference {
    /// Streams a job: `(choice, event)` as they come, ending when every choice has finished.
    fn run_stream(&self, job: &Job) -> Result<BoxStream<'static, (usize, Event)>> {
        let receivers = self.start(job)?;
        let streams = receivers.into_iter().enumerate().map(|(i, rx)| {
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(move |e| (i, e))
                .boxed()
        });
        Ok(futures::stream::select_all(streams).boxed())
    }

    /// Streams the answer to a request of `api`: builds its `job`, sends a message for each
    /// of `prelude`'s choices, then one for each piece that `choice` keeps as the choices
    /// decode, and a last one with the usage. Usage is recorded before the last message, and
    /// also when the client goes away (dropping the events then cancels the sequences),
    /// unless the server is stopping (then it was the server that ended the stream).
    pub(super) fn stream<L: Send + 'static, M: Message>(
        &self,
        caller: &Principal,
        api: &'static Api<L>,
        model: String,
        job: impl FnOnce() -> Result<Job>,
        prelude: impl FnOnce(&Job) -> Vec<M::Choice>,
        mut choice: impl FnMut(Piece<L>) -> Option<M::Choice> + Send + 'static,
    ) -> Result<BoxStream<'static, Result<M, Status>>> {
        let (start, job, id) = api.begin(job)?;
        let envelope = Envelope {
            id,
            created: start / 1_000_000,
            model,
        };
        let prelude = prelude(&job);
        let mut events = self.run_stream(&job)?;
        let (tx, rx) = mpsc::channel::<Result<M, Status>>(64);
        let this = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            let mut counts = Counts::default();
            let mut failed = None;
            let mut gone = false;
            for first in prelude {
                gone |= tx
                    .send(Ok(M::new(&envelope, vec![first], None)))
                    .await
                    .is_err();
            }
            while !gone && let Some((index, event)) = events.next().await {
                let piece = match event {
                    Event::Failed(reason) => {
                        failed = Some(reason);
                        break;
                    }
                    Event::Finished {
                        finish,
                        text,
                        completion_tokens,
                        cached_prompt_tokens,
                    } => {
                        counts.add(completion_tokens, cached_prompt_tokens);
                        Piece {
                            index,
                            text,
                            finish: finish.as_str(),
                            logprobs: None,
                        }
                    }
                    Event::Token { sampled, text } => Piece {
                        index,
                        text,
                        finish: "",
                        logprobs: job.logprobs(api, std::slice::from_ref(&sampled)),
                    },
                };
                if let Some(c) = choice(piece) {
                    gone = tx.send(Ok(M::new(&envelope, vec![c], None))).await.is_err();
                }
            }
            drop(events);
            if gone && *this.draining.borrow() {
                // The server ended the stream (a stop whose grace ran out): the client got
                // UNAVAILABLE, not an answer, and is not billed for it.
                tracing::info!(id = %envelope.id, "a stream cut by the shutdown is not billed");
                return;
            }
            let recorded = this
                .record(&caller, &job, &envelope.id, api.name, counts, start)
                .await;
            if gone {
                return;
            }
            let end = match (failed, recorded) {
                (Some(reason), _) => Err(Status::internal(reason)),
                (None, Err(e)) => Err(e.into()),
                (None, Ok(())) => Ok(M::new(&envelope, Vec::new(), Some(usage(&job, counts)))),
            };
            let _ = tx.send(end).await;
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}
