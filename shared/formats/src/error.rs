//! The error every reader here returns.

/// A file that cannot be used as it is: `file` names it (as the user knows it), `problem` says
/// what is wrong in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct FormatError {
    pub file: String,
    pub problem: String,
}

impl FormatError {
    pub fn new(file: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FormatError;

    #[test]
    fn format_error_names_file_and_problem() {
        let err = FormatError::new(
            "model.gguf",
            "unexpected end of file while reading the version",
        );
        assert_eq!(err.file, "model.gguf");
        assert_eq!(
            err.to_string(),
            "model.gguf: unexpected end of file while reading the version"
        );
    }
}
