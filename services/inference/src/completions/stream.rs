//! Streamed answers: a message per piece as it decodes, then one with the finish reasons and
//! the usage, whichever API the messages are of.

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::auth::Principal;
use tokio::sync::mpsc;
use tonic::Status;

use super::response::usage;
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

    /// Sends a streamed job's messages: `message` turns each event into one (or none), the
    /// last carries the usage (`last`). Usage is recorded before the last message, and also
    /// when the client goes away (dropping the events then cancels the sequences).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn spawn_stream<M: Send + 'static>(
        &self,
        caller: &Principal,
        job: Job,
        api: &'static str,
        id: String,
        start: i64,
        prelude: Vec<M>,
        mut message: impl FnMut(&Job, usize, Event) -> Option<M> + Send + 'static,
        last: impl FnOnce(kiln_proto::kiln_inference::v1::Usage) -> M + Send + 'static,
    ) -> Result<BoxStream<'static, Result<M, Status>>> {
        let mut events = self.run_stream(&job)?;
        let (tx, rx) = mpsc::channel::<Result<M, Status>>(64);
        let this = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            let mut counts = Counts::default();
            let mut failed = None;
            let mut gone = false;
            for m in prelude {
                gone |= tx.send(Ok(m)).await.is_err();
            }
            while !gone && let Some((index, event)) = events.next().await {
                match &event {
                    Event::Failed(reason) => {
                        failed = Some(reason.clone());
                        break;
                    }
                    Event::Finished {
                        completion_tokens,
                        cached_prompt_tokens,
                        ..
                    } => counts.add(*completion_tokens, *cached_prompt_tokens),
                    Event::Token { .. } => {}
                }
                if let Some(m) = message(&job, index, event) {
                    gone = tx.send(Ok(m)).await.is_err();
                }
            }
            drop(events);
            let recorded = this.record(&caller, &job, &id, api, counts, start).await;
            if gone {
                return;
            }
            let end = match (failed, recorded) {
                (Some(reason), _) => Err(Status::internal(reason)),
                (None, Err(e)) => Err(e.into()),
                (None, Ok(())) => Ok(last(usage(&job, counts))),
            };
            let _ = tx.send(end).await;
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}
