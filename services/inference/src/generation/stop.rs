//! Stop sequences over streamed text: text is released only once it can no longer be the
//! start of a stop sequence, so a stop that spans tokens is cut cleanly and never shown.

/// Watches generated text for any of the stop sequences.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released yet (it may begin a stop sequence).
    held: String,
}

/// What a piece of text released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop sequence was found: `text` ends right before it, and generation should end.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds generated text; returns what is safe to show.
    pub fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        // The earliest complete stop sequence ends generation.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..at].to_owned();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Keep the longest tail that is a prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .map(|stop| {
                (1..stop.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| {
                        self.held.is_char_boundary(self.held.len() - n)
                            && stop.is_char_boundary(n)
                            && self.held.ends_with(&stop[..n])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_owned();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// The end of generation without a stop: what was held back is text after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_spanning_pieces_is_cut_before_it() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(
            m.push("Hello"),
            Released {
                text: "Hello".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push(" there\nUs"),
            Released {
                text: " there".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("er: more"),
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_is_released() {
        let mut m = StopMatcher::new(vec!["END".into(), "STOP".into()]);
        assert_eq!(m.push("a S").text, "a ");
        assert_eq!(m.push("T").text, "");
        assert_eq!(m.push("ay").text, "STay");
        assert_eq!(m.push("EN").text, "");
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn without_stops_everything_passes() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("x").text, "x");
    }
}
