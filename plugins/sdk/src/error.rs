use std::fmt;

/// Why a plugin call failed. The host acts on the variant, so pick the one that says who must act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The step's config or input schema is not acceptable; the text names the key and the reason.
    InvalidConfig(String),
    /// A batch or a restored state cannot be processed as a whole.
    BadInput(String),
    /// A bug or broken invariant in the plugin.
    Internal(String),
}

/// `Result` with the plugin [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidConfig`] naming the config key at fault.
    pub fn config(key: &str, message: impl fmt::Display) -> Self {
        if key.is_empty() {
            Error::InvalidConfig(message.to_string())
        } else {
            Error::InvalidConfig(format!("`{key}`: {message}"))
        }
    }

    /// An [`Error::BadInput`].
    pub fn bad_input(message: impl fmt::Display) -> Self {
        Error::BadInput(message.to_string())
    }

    /// An [`Error::Internal`].
    pub fn internal(message: impl fmt::Display) -> Self {
        Error::Internal(message.to_string())
    }

    /// The text, without the variant.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidConfig(m) | Error::BadInput(m) | Error::Internal(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig(m) => write!(f, "invalid config: {m}"),
            Error::BadInput(m) => write!(f, "bad input: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Internal(format!("arrow: {e}"))
    }
}
