//! Secret files under the data dir: created once, with mode 0600, never overwritten. A missing
//! file is created with 32 random bytes as hex; an existing one is read back as it is.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

/// The file's trimmed text, creating it with a fresh random 32-byte hex secret when missing.
pub fn load_or_create(path: &Path) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => return Ok(text.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(io::Error::other)?;
    let text = crate::artifacts::hex(&bytes);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    writeln!(file, "{text}")?;
    file.sync_all()?;
    Ok(text)
}

/// A 32-byte key kept as hex in `path` (created when missing).
pub fn load_or_create_key(path: &Path) -> io::Result<[u8; 32]> {
    let text = load_or_create(path)?;
    blake3::Hash::from_hex(&text).map(|h| *h.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not 64 hex characters; restore the right file", path.display()),
        )
    })
}
