//! What `kiln dev` keeps in its data dir between starts.

use std::path::Path;

/// The page-token secret in the data dir (owner-only, like the admin key), created on the
/// first start, so page tokens stay valid across restarts.
pub fn dev_page_secret(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("page-token.secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        return Ok(secret.trim().to_owned());
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    kiln_core::config::write_private_file(&path, &secret)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    #[test]
    fn the_secret_is_kept_owner_only_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = super::dev_page_secret(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("page-token.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(super::dev_page_secret(dir.path()).unwrap(), first);
        assert_eq!(first.len(), 64);
    }
}
