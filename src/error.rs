//! The crate's error type: one enum gathering every module's failures, with
//! messages that name the value, the file or the field and what was expected.

use std::path::PathBuf;

/// Everything that can fail in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing, unknown or out of range.
    #[error("{0}")]
    Config(String),
    /// A model directory, config or checkpoint is unusable.
    #[error("{0}")]
    Model(String),
    /// A tensor in a checkpoint has the wrong shape or dtype.
    #[error("tensor `{name}` in {file}: {msg}")]
    Tensor {
        /// Tensor name as stored in the checkpoint.
        name: String,
        /// File that holds it.
        file: PathBuf,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// The input file or one of its records is unusable at job level.
    #[error("{0}")]
    Input(String),
    /// Tokenizer or chat template failure.
    #[error("{0}")]
    Prompt(String),
    /// Writing the output failed.
    #[error("{0}")]
    Output(String),
    /// Another live process holds the output's lock.
    #[error("{0}")]
    Busy(String),
    /// The output holds rows of a different job (resume refused).
    #[error("{0}")]
    DifferentJob(String),
    /// A part file of the output cannot be read.
    #[error("{0}")]
    CorruptPart(String),
    /// A file could not be read or written.
    #[error("failed to access {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The run was stopped by a signal; the output is resumable.
    #[error("{0}")]
    Interrupted(String),
    /// The GPU failed at run time (a kernel launch, an allocation, the
    /// driver): not the model's fault, often worth a retry.
    #[error("device: {0}")]
    Device(String),
    /// The engine broke one of its own invariants (a bug, not bad input).
    #[error("engine: {0}")]
    Engine(String),
    /// Tensor backend error.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an io error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Process exit code for this error class, as README's table gives
    /// them (64, a command-line usage error, is the CLI's).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Input(_) => 2,
            Error::Model(_) | Error::Tensor { .. } => 3,
            Error::Device(_) => 4,
            Error::Busy(_) => 5,
            Error::DifferentJob(_) => 6,
            Error::CorruptPart(_) => 7,
            Error::Interrupted(_) => 130,
            _ => 1,
        }
    }
}
