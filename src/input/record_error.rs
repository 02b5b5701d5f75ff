//! Why one record cannot run: it becomes an error row (`status = "error"`,
//! `error` = this rendered), never a dead job.

/// A record-level failure, from reading the input to fitting the cache.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// The line or row is not a record: invalid UTF-8, malformed JSON, not
    /// an object. The message names the line.
    #[error("{0}")]
    Unreadable(String),
    /// A field is missing, null, of the wrong type or out of range. The
    /// message names the record, the column and what was expected.
    #[error("{0}")]
    Field(String),
    /// The chat template or the tokenizer failed on the record.
    #[error("record {record}: {message}")]
    Prompt {
        /// Record id.
        record: String,
        /// What failed.
        message: String,
    },
    /// The prompt is longer than `engine.max_prompt_tokens` (or the context).
    #[error("record {record}: prompt has {tokens} tokens, max_prompt_tokens is {limit}")]
    PromptTooLong {
        /// Record id.
        record: String,
        /// Its prompt tokens.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// Prompt + continuation are longer than the model's context.
    #[error(
        "record {record}: prompt + continuation has {tokens} tokens, the context is {context}"
    )]
    ContextTooShort {
        /// Record id.
        record: String,
        /// Prompt + continuation tokens.
        tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// The whole KV cache cannot hold the record.
    #[error(
        "record {record}: prompt ({prompt}) + {what} needs {need} cache tokens, the KV cache holds {capacity} (engine.num_blocks x engine.block_size)"
    )]
    CacheTooSmall {
        /// Record id.
        record: String,
        /// Prompt tokens.
        prompt: usize,
        /// What comes after the prompt: `max_new_tokens` or `continuation`.
        what: &'static str,
        /// Cache tokens it needs.
        need: usize,
        /// Cache tokens there are.
        capacity: usize,
    },
    /// Loglikelihood mode: the continuation is missing, empty or does not
    /// tokenize as an extension of the prompt.
    #[error("record {record}: {problem}")]
    Continuation {
        /// Record id.
        record: String,
        /// What is wrong with it.
        problem: String,
    },
}
