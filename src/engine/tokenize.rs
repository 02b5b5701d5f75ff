//! Records to token ids: the chat template, the length checks, and the
//! continuation of a scoring record. Runs on the reader thread.

use crate::input::{InputRecord, PromptInput, RecordBody, RecordError};
use crate::prompt::Prompter;

/// A record's tokens, ready to become a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// Prompt tokens, then (scoring) the continuation's.
    pub tokens: Vec<u32>,
    /// Where the prompt ends.
    pub prompt_len: usize,
}

/// A record read and tokenized ahead of the step loop, or why it cannot run.
pub type Prepared = (InputRecord, std::result::Result<Tokenized, RecordError>);

/// Tokenizes records for one job.
pub struct Tokenizer<'a> {
    /// Template and tokenizer.
    pub prompter: &'a Prompter,
    /// The job's system prompt (records without their own).
    pub job_system: &'a str,
    /// Longest accepted prompt.
    pub max_prompt_tokens: usize,
    /// The model's context length.
    pub ctx: usize,
    /// Tokens the whole KV cache holds.
    pub capacity: usize,
    /// Score the continuation column instead of generating.
    pub score: bool,
}

impl Tokenizer<'_> {
    /// The record's tokens, checked against the prompt limit, the context
    /// and the cache.
    pub fn prepare(&self, rec: &InputRecord) -> std::result::Result<Tokenized, RecordError> {
        let t = if self.score {
            self.continuation_tokens(rec)?
        } else {
            let tokens = self.prompt_tokens(rec)?;
            Tokenized {
                prompt_len: tokens.len(),
                tokens,
            }
        };
        let need = if self.score {
            if t.tokens.len() > self.ctx {
                return Err(RecordError::ContextTooShort {
                    record: rec.id.clone(),
                    tokens: t.tokens.len(),
                    context: self.ctx,
                });
            }
            t.tokens.len()
        } else {
            let params = &rec
                .body
                .as_ref()
                .expect("tokenized records have a body")
                .params;
            t.prompt_len + params.max_new_tokens.min(self.ctx - t.prompt_len)
        };
        if need > self.capacity {
            return Err(RecordError::CacheTooSmall {
                record: rec.id.clone(),
                prompt: t.prompt_len,
                what: if self.score {
                    "continuation"
                } else {
                    "max_new_tokens"
                },
                need,
                capacity: self.capacity,
            });
        }
        Ok(t)
    }

    /// A record's prompt through the chat template.
    fn render(&self, rec: &InputRecord) -> std::result::Result<String, RecordError> {
        let body = rec.body.as_ref().map_err(|e| e.clone())?;
        let messages = match &body.prompt {
            PromptInput::Tokens(ids) => {
                // Token prompts are not rendered; shown decoded if asked.
                return Ok(self.prompter.decode(ids).unwrap_or_default());
            }
            PromptInput::Messages { system, messages } => {
                Prompter::with_system(messages, system.as_deref(), self.job_system)
            }
            PromptInput::Text { system, user } => {
                Prompter::messages(system.as_deref(), self.job_system, user)
            }
        };
        self.prompter
            .render(&messages)
            .map_err(|e| prompt_error(rec, e))
    }

    /// Renders and tokenizes a record's prompt, checking its length.
    fn prompt_tokens(&self, rec: &InputRecord) -> std::result::Result<Vec<u32>, RecordError> {
        if let Ok(RecordBody {
            prompt: PromptInput::Tokens(ids),
            ..
        }) = &rec.body
        {
            return self.checked_len(rec, ids.clone());
        }
        let text = self.render(rec)?;
        self.encode_prompt(rec, &text)
    }

    fn encode_prompt(
        &self,
        rec: &InputRecord,
        text: &str,
    ) -> std::result::Result<Vec<u32>, RecordError> {
        let ids = self
            .prompter
            .encode(text)
            .map_err(|e| prompt_error(rec, e))?;
        self.checked_len(rec, ids)
    }

    /// A prompt's ids, or the record's error when they pass
    /// `max_prompt_tokens`.
    fn checked_len(
        &self,
        rec: &InputRecord,
        ids: Vec<u32>,
    ) -> std::result::Result<Vec<u32>, RecordError> {
        if ids.len() > self.max_prompt_tokens {
            return Err(RecordError::PromptTooLong {
                record: rec.id.clone(),
                tokens: ids.len(),
                limit: self.max_prompt_tokens,
            });
        }
        Ok(ids)
    }

    /// Prompt + continuation tokens: the continuation's tokens are those
    /// that encoding prompt + continuation adds after the prompt's own
    /// encoding.
    fn continuation_tokens(
        &self,
        rec: &InputRecord,
    ) -> std::result::Result<Tokenized, RecordError> {
        let body = rec.body.as_ref().map_err(|e| e.clone())?;
        let problem = |p: &str| RecordError::Continuation {
            record: rec.id.clone(),
            problem: p.to_string(),
        };
        let cont = body.continuation.as_deref().ok_or_else(|| {
            problem("the continuation is missing or null, expected a string (scoring.mode = loglikelihood)")
        })?;
        if cont.is_empty() {
            return Err(problem("the continuation is empty"));
        }
        let text = self.render(rec)?;
        let prompt = self.encode_prompt(rec, &text)?;
        let all = self
            .prompter
            .encode(&format!("{text}{cont}"))
            .map_err(|e| prompt_error(rec, e))?;
        if all.len() <= prompt.len() || all[..prompt.len()] != prompt[..] {
            return Err(problem(
                "the continuation does not tokenize as an extension of the prompt",
            ));
        }
        Ok(Tokenized {
            prompt_len: prompt.len(),
            tokens: all,
        })
    }
}

/// A template or tokenizer failure on a record.
fn prompt_error(rec: &InputRecord, e: crate::Error) -> RecordError {
    RecordError::Prompt {
        record: rec.id.clone(),
        message: e.to_string(),
    }
}
