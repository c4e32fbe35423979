//! Checkpoints sealed at rest. With a key (`RESTORE_LAUNCHER_KEY_FILE`, a file such as a
//! Secret volume's, or `RESTORE_LAUNCHER_KEY`, such as a Secret's `secretKeyRef`), every
//! archive this launcher writes is encrypted in the age format (age-encryption.org/v1, by the
//! `age` crate), and every archive it reads must be sealed with that key: a wrong key, a plain
//! archive, or a sealed one without a key is refused before a byte of it is used. No
//! cryptography of our own.
//!
//! The key is a shared secret of at least 32 characters (`restore-launcher keygen` prints 256
//! random bits), used with age's scrypt recipient: the file key is wrapped under a key derived
//! from the secret, and the header is authenticated under the file key, so only a holder of
//! the secret can make an archive a launcher accepts (an X25519 recipient would let anyone
//! who learned the public half forge one). The payload is ChaCha20-Poly1305 in authenticated
//! 64 KiB chunks, so tampering or truncation fails. scrypt's work factor is kept low (2^10):
//! the secret's entropy, not scrypt, is what resists guessing, and a pod's memory is spared.

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;

use age::secrecy::ExposeSecret as _;

/// Environment variable naming a file that holds the key.
pub const KEY_FILE_ENV: &str = "RESTORE_LAUNCHER_KEY_FILE";
/// Environment variable holding the key itself.
pub const KEY_ENV: &str = "RESTORE_LAUNCHER_KEY";
/// How every age file begins.
const AGE_MAGIC: &[u8] = b"age-encryption.org/";
/// The shortest key taken.
pub const MIN_KEY_LEN: usize = 32;
/// scrypt's work factor (log2 N), for sealing and the most accepted when opening.
const WORK_FACTOR: u8 = 10;

/// Where this launcher's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    /// The environment variable [`KEY_ENV`] (read when used, never stored or logged).
    Env,
}

impl KeySource {
    /// The key this launcher's environment names, if any.
    pub fn from_env() -> Option<KeySource> {
        if let Some(path) = std::env::var_os(KEY_FILE_ENV).filter(|p| !p.is_empty()) {
            return Some(KeySource::File(path.into()));
        }
        std::env::var_os(KEY_ENV)
            .filter(|k| !k.is_empty())
            .map(|_| KeySource::Env)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the key file `{}` ({KEY_FILE_ENV})", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} holds no key: a line of at least {MIN_KEY_LEN} characters, as `restore-launcher keygen` prints it"
    )]
    BadKey(String),
    #[error(
        "the archive is encrypted and this launcher has no key: set {KEY_FILE_ENV} to a file holding it (a Secret volume) or {KEY_ENV} (a Secret's secretKeyRef), as on the source"
    )]
    NoKey,
    #[error(
        "the archive is not encrypted, but this launcher has a key and takes only archives sealed with it"
    )]
    NotSealed,
    #[error("the archive is encrypted with another key than this launcher's ({0})")]
    WrongKey(String),
    #[error("the archive's encryption header is not valid ({0})")]
    Header(String),
    #[error("cannot start encrypting the archive")]
    Encrypt(#[source] io::Error),
}

/// The shared secret that seals and opens archives.
pub struct Key(age::secrecy::SecretString);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: a short fingerprint of it, to compare two launchers' keys.
        write!(f, "Key({})", self.fingerprint())
    }
}

impl Key {
    /// Reads the key from `source`.
    ///
    /// # Errors
    /// [`SealError::ReadKey`], [`SealError::BadKey`].
    pub fn load(source: &KeySource) -> Result<Key, SealError> {
        let (text, what) = match source {
            KeySource::File(path) => (
                std::fs::read_to_string(path).map_err(|source| SealError::ReadKey {
                    path: path.clone(),
                    source,
                })?,
                format!("the key file `{}`", path.display()),
            ),
            KeySource::Env => (std::env::var(KEY_ENV).unwrap_or_default(), KEY_ENV.into()),
        };
        Key::parse(&text).ok_or(SealError::BadKey(what))
    }

    /// The first line of `text` that is not blank or a `#` comment, if it is long enough.
    pub fn parse(text: &str) -> Option<Key> {
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|line| line.len() >= MIN_KEY_LEN)
            .map(|line| Key(line.to_string().into()))
    }

    /// A new key of 256 random bits, as the text of a key file.
    ///
    /// # Errors
    /// When the kernel's random source cannot be read.
    pub fn generate() -> io::Result<String> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(format!(
            "# restore-launcher sealing key: keep it secret (a Secret); give the same to the source and the target\nMIGRATE-KEY-{}\n",
            hex::encode(bytes)
        ))
    }

    /// The first 8 hex digits of the key's SHA-256 (safe to show: it reveals nothing usable).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(self.0.expose_secret().as_bytes()))[..8].to_string()
    }
}

/// Wraps `out` so that what is written to it is sealed with `key`; `finish` the returned
/// writer to write the final authenticated chunk.
///
/// # Errors
/// [`SealError::Encrypt`] when the header cannot be written.
pub fn seal<W: Write>(out: W, key: &Key) -> Result<age::stream::StreamWriter<W>, SealError> {
    let mut recipient = age::scrypt::Recipient::new(key.0.clone());
    recipient.set_work_factor(WORK_FACTOR);
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .map_err(|e| SealError::Encrypt(io::Error::other(e.to_string())))?;
    encryptor.wrap_output(out).map_err(SealError::Encrypt)
}

/// The archive's bytes from `input`: opened with `key` when sealed. Refuses a sealed archive
/// without a key, a plain one with a key, and one sealed to another key. Reads only the
/// header before deciding.
///
/// # Errors
/// [`SealError::NoKey`], [`SealError::NotSealed`], [`SealError::WrongKey`],
/// [`SealError::Header`].
pub fn open<'a, R: BufRead + 'a>(
    mut input: R,
    key: Option<&Key>,
) -> Result<Box<dyn Read + 'a>, SealError> {
    // The first bytes decide. A stream may deliver fewer than the magic's length at first,
    // and a BufReader refills only once empty: a prefix of the magic is taken as sealed (a
    // plain archive begins with zstd's magic, which differs from the first byte on).
    let sealed = {
        let start = input
            .fill_buf()
            .map_err(|e| SealError::Header(e.to_string()))?;
        let n = start.len().min(AGE_MAGIC.len());
        n > 0 && start[..n] == AGE_MAGIC[..n]
    };
    match (sealed, key) {
        (false, None) => Ok(Box::new(input)),
        (false, Some(_)) => Err(SealError::NotSealed),
        (true, None) => Err(SealError::NoKey),
        (true, Some(key)) => {
            let decryptor = age::Decryptor::new_buffered(input)
                .map_err(|e| SealError::Header(e.to_string()))?;
            let mut identity = age::scrypt::Identity::new(key.0.clone());
            // A file asking for more work is not ours (and could make us compute for hours).
            identity.set_max_work_factor(WORK_FACTOR);
            let reader = decryptor
                .decrypt(std::iter::once(&identity as &dyn age::Identity))
                .map_err(|e| match e {
                    age::DecryptError::NoMatchingKeys | age::DecryptError::DecryptionFailed => {
                        SealError::WrongKey(e.to_string())
                    }
                    other => SealError::Header(other.to_string()),
                })?;
            Ok(Box::new(reader))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::parse(&Key::generate().unwrap_or_default())
            .unwrap_or_else(|| panic!("a generated key parses"))
    }

    fn sealed(data: &[u8], key: &Key) -> Vec<u8> {
        let mut out = Vec::new();
        let mut writer = seal(&mut out, key).unwrap_or_else(|e| panic!("{e}"));
        writer.write_all(data).unwrap_or_default();
        writer.finish().unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn read_all(input: &[u8], key: Option<&Key>) -> Result<Vec<u8>, String> {
        let mut reader = open(io::BufReader::new(input), key).map_err(|e| e.to_string())?;
        let mut data = Vec::new();
        reader
            .read_to_end(&mut data)
            .map_err(|e| format!("read: {e}"))?;
        Ok(data)
    }

    #[test]
    fn a_sealed_archive_opens_with_its_key_only() {
        let (right, wrong) = (key(), key());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let archive = sealed(&data, &right);
        assert!(archive.starts_with(AGE_MAGIC));
        assert!(
            !archive.windows(64).any(|w| w == &data[1000..1064]),
            "plaintext visible"
        );
        assert_eq!(read_all(&archive, Some(&right)), Ok(data.clone()));
        let refused = read_all(&archive, Some(&wrong)).unwrap_err();
        assert!(refused.contains("another key"), "{refused}");
        let no_key = read_all(&archive, None).unwrap_err();
        assert!(no_key.contains(KEY_FILE_ENV), "{no_key}");
        // A plain archive is refused by a launcher with a key, taken by one without.
        let plain = read_all(&data, Some(&right)).unwrap_err();
        assert!(plain.contains("not encrypted"), "{plain}");
        assert_eq!(read_all(&data, None), Ok(data));
    }

    #[test]
    fn a_tampered_or_truncated_sealed_archive_fails_authentication() {
        let key = key();
        let data = vec![7u8; 300_000];
        let mut archive = sealed(&data, &key);
        let truncated = &archive[..archive.len() - 100];
        assert!(read_all(truncated, Some(&key)).is_err());
        let middle = archive.len() / 2;
        archive[middle] ^= 1;
        assert!(read_all(&archive, Some(&key)).is_err());
    }

    #[test]
    fn keys_parse_from_key_files_and_never_print() {
        let text = Key::generate().unwrap_or_default();
        assert!(text.starts_with("# restore-launcher sealing key"));
        let key = Key::parse(&format!("\n# a comment\n{text}")).unwrap_or_else(|| panic!());
        let secret = text.lines().nth(1).unwrap_or_default();
        let shown = format!("{key:?}");
        assert!(
            shown.starts_with("Key(") && !shown.contains(&secret[12..20]),
            "{shown}"
        );
        assert!(Key::parse("too short").is_none());
        assert_ne!(Key::generate().unwrap_or_default(), text, "not random");
    }

    #[test]
    fn only_a_holder_of_the_secret_can_make_an_archive_that_opens() {
        // The age header is authenticated under the file key, which only the secret unwraps:
        // an archive sealed with any other secret is refused, whatever else is known.
        let (ours, forger) = (key(), key());
        let forged = sealed(b"malicious manifest", &forger);
        let refused = read_all(&forged, Some(&ours)).unwrap_err();
        assert!(refused.contains("another key"), "{refused}");
    }
}
