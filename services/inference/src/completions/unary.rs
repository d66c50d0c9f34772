//! Unary answers: every choice run to its end, then one message with them all and the usage.

use kiln_core::Error;
use kiln_core::auth::Principal;

use super::response::{Api, Envelope, Message, Piece, usage};
use super::{ChoiceResult, Counts, Event, Finish, Job};
use crate::service::Inference;
use kiln_core::Result;

impl Inference {
    /// Answers a request of `api` whole: builds its `job`, runs every choice to its end, makes
    /// each an answer's choice with `choice`, and records the usage before answering.
    pub(super) async fn answer<L, M: Message>(
        &self,
        caller: &Principal,
        api: &Api<L>,
        model: String,
        job: impl FnOnce() -> Result<Job>,
        mut choice: impl FnMut(&Job, Piece<L>) -> M::Choice,
    ) -> Result<M> {
        let (start, job, id) = api.begin(job)?;
        let (results, counts) = self.run_unary(caller, &job, &id, api.name, start).await?;
        let choices = results
            .into_iter()
            .enumerate()
            .map(|(index, result)| {
                let piece = Piece {
                    index,
                    logprobs: job.logprobs(api, &result.tokens),
                    finish: result.finish.map(Finish::as_str).unwrap_or_default(),
                    text: result.text,
                };
                choice(&job, piece)
            })
            .collect();
        let envelope = Envelope {
            id,
            created: kiln_core::time::now_micros() / 1_000_000,
            model,
        };
        Ok(M::new(&envelope, choices, Some(usage(&job, counts))))
    }

    /// Runs a job to the end and records its usage: every choice's text, tokens and finish,
    /// and their counts.
    async fn run_unary(
        &self,
        caller: &Principal,
        job: &Job,
        id: &str,
        api: &'static str,
        start: i64,
    ) -> Result<(Vec<ChoiceResult>, Counts)> {
        let receivers = self.start(job)?;
        let gathered = futures::future::join_all(receivers.into_iter().map(|mut rx| async move {
            let mut result = ChoiceResult::default();
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Token { sampled, text } => {
                        result.text.push_str(&text);
                        result.tokens.push(sampled);
                    }
                    Event::Finished {
                        finish,
                        completion_tokens,
                        cached_prompt_tokens,
                        text,
                    } => {
                        result.text.push_str(&text);
                        result.finish = Some(finish);
                        result.counts.add(completion_tokens, cached_prompt_tokens);
                        return Ok(result);
                    }
                    Event::Failed(message) => return Err(Error::Internal(message)),
                }
            }
            Err(Error::Internal("the generation loop stopped".into()))
        }))
        .await;
        let results = gathered.into_iter().collect::<Result<Vec<_>, _>>()?;
        let counts = Counts::sum(&results);
        self.record(caller, job, id, api, counts, start).await?;
        Ok((results, counts))
    }
}
