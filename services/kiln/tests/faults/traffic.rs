//! Clients that keep calling while a scenario breaks things: what each saw, and a check that
//! none waited past its deadline or got an error a fault should not cause.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_tests::inference::embed;
use kiln_tests::{AuthedChannel, wait_for};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

/// The longest any call may take, whatever breaks: past it, a call hung.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What the clients saw so far.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub answered: i64,
    /// Tokens the answers reported as their usage.
    pub tokens: i64,
    /// Calls refused, by code (each a clean error the fault may cause).
    pub refused: BTreeMap<String, usize>,
}

impl Tally {
    pub fn calls(&self) -> i64 {
        self.answered + self.refused.values().sum::<usize>() as i64
    }
}

/// Clients embedding texts in a loop until stopped.
pub struct Traffic {
    tally: Arc<Mutex<Tally>>,
    stop: watch::Sender<bool>,
    clients: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// `clients` loops of CreateEmbeddings on `model` through `ch`; an error whose code is
    /// not in `clean` fails the scenario, as does a call past [`DEADLINE`].
    pub fn embeddings(
        ch: &AuthedChannel,
        model: &str,
        clients: usize,
        clean: &'static [Code],
    ) -> Self {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, stopped) = watch::channel(false);
        let clients = (0..clients)
            .map(|client| {
                let (ch, model, tally, stopped) =
                    (ch.clone(), model.to_owned(), tally.clone(), stopped.clone());
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !*stopped.borrow() {
                        n += 1;
                        // Texts of different lengths, so token counts differ between calls.
                        let text = [format!(
                            "client {client} call {n}: {}",
                            "word ".repeat(n % 7)
                        )];
                        let call = embed(&ch, &model, &text);
                        let answer = tokio::time::timeout(DEADLINE, call)
                            .await
                            .unwrap_or_else(|_| panic!("an embedding hung past {DEADLINE:?}"));
                        let refused = {
                            let mut t = tally.lock().unwrap();
                            match answer {
                                Ok(answer) => {
                                    t.answered += 1;
                                    let usage = answer.usage.expect("usage");
                                    t.tokens += i64::from(usage.prompt_tokens);
                                    false
                                }
                                Err(status) if clean.contains(&status.code()) => {
                                    let code = format!("{:?}", status.code());
                                    *t.refused.entry(code).or_default() += 1;
                                    true
                                }
                                Err(status) => panic!("a fault caused {status:?}"),
                            }
                        };
                        if refused {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            tally,
            stop,
            clients,
        }
    }

    pub fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Waits until `more` calls beyond the present ones have ended (answered or refused).
    pub async fn calls(&self, more: i64) -> Tally {
        let target = self.tally().calls() + more;
        let what = format!("{more} more calls to end");
        wait_for(DEADLINE, &what, || async {
            let t = self.tally();
            (t.calls() >= target).then_some(t)
        })
        .await
    }

    /// Waits until `more` answers beyond the present ones.
    pub async fn answers(&self, more: i64) -> Tally {
        let target = self.tally().answered + more;
        let what = format!("{more} more answers");
        wait_for(Duration::from_secs(60), &what, || async {
            let t = self.tally();
            (t.answered >= target).then_some(t)
        })
        .await
    }

    /// Stops the clients (each ends its call first); what they saw.
    pub async fn stop(self) -> Tally {
        self.stop.send_replace(true);
        for client in self.clients {
            client.await.expect("a client panicked");
        }
        self.tally.lock().unwrap().clone()
    }
}
