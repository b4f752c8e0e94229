//! The bounds of what a save records beside its images (the save log, the engine's version):
//! the coordinator refuses a commit beyond them, and the worker fits its log within them first.

use crate::names::acts_on_terminal;

/// Lines one save log may hold.
pub const MAX_SAVE_LOG_LINES: usize = 10_000;
/// Bytes one save log line may hold.
pub const MAX_SAVE_LOG_LINE: usize = 1024;
/// Bytes one save log may hold, its lines together.
pub const MAX_SAVE_LOG_BYTES: usize = 1 << 20;
/// Bytes of an engine version (e.g. "28.5.2").
pub const MAX_ENGINE_VERSION: usize = 64;

/// Why a save log or engine version was refused: one line naming the limit.
pub fn check_save_log(lines: &[String]) -> Result<(), String> {
    if lines.len() > MAX_SAVE_LOG_LINES {
        return Err(format!("a save log holds at most {MAX_SAVE_LOG_LINES} lines, not {}", lines.len()));
    }
    if lines.iter().any(|line| line.len() > MAX_SAVE_LOG_LINE) {
        return Err(format!("a save log line holds at most {MAX_SAVE_LOG_LINE} bytes"));
    }
    let total: usize = lines.iter().map(String::len).sum();
    if total > MAX_SAVE_LOG_BYTES {
        return Err(format!("a save log holds at most {MAX_SAVE_LOG_BYTES} bytes, not {total}"));
    }
    if lines.iter().any(|line| line.chars().any(acts_on_terminal)) {
        return Err(
            "a save log line holds no control or bidirectional-override characters (escape codes, line breaks)".into(),
        );
    }
    Ok(())
}

/// Checks an engine's version: at most [`MAX_ENGINE_VERSION`] printable ASCII characters.
pub fn check_engine_version(version: &str) -> Result<(), String> {
    if version.len() > MAX_ENGINE_VERSION || !version.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "an engine version has at most {MAX_ENGINE_VERSION} printable ASCII characters, no spaces"
        ));
    }
    Ok(())
}

/// `lines` fitted within the bounds: characters a terminal acts on shown as `?`, long lines cut (ending
/// in `…`), and the lines beyond the count or byte bound replaced by one saying how many.
pub fn fit_save_log(lines: Vec<String>) -> Vec<String> {
    const MORE: usize = 64;
    let n_lines = lines.len();
    let mut fitted = Vec::with_capacity(n_lines.min(MAX_SAVE_LOG_LINES));
    let mut total = 0;
    for line in lines {
        let mut line: String = line.chars().map(|c| if acts_on_terminal(c) { '?' } else { c }).collect();
        if line.len() > MAX_SAVE_LOG_LINE {
            let mut cut = MAX_SAVE_LOG_LINE - '…'.len_utf8();
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        if fitted.len() + 1 >= MAX_SAVE_LOG_LINES || total + line.len() + MORE > MAX_SAVE_LOG_BYTES {
            fitted.push(format!("… and {} more lines", n_lines - fitted.len()));
            return fitted;
        }
        total += line.len();
        fitted.push(line);
    }
    fitted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fitted_log_passes_the_check_and_keeps_a_short_one_as_it_is() {
        let short = vec!["image sha256:ab (app:1)".to_owned(), "  layer sha256:cd 1.0 MiB new".to_owned()];
        assert_eq!(fit_save_log(short.clone()), short);
        let many = vec!["x".repeat(200); 20_000];
        let fitted = fit_save_log(many.clone());
        assert!(check_save_log(&many).is_err());
        assert_eq!(check_save_log(&fitted), Ok(()));
        assert!(fitted.last().unwrap().starts_with("… and "), "{:?}", fitted.last());
        let long = vec!["é".repeat(4000), "\u{1b}]52;c;aGk=\u{7}".to_owned(), "\u{202e}txt".to_owned()];
        let fitted = fit_save_log(long.clone());
        assert!(check_save_log(&long).is_err());
        assert_eq!(check_save_log(&fitted), Ok(()));
        assert!(fitted[0].ends_with('…') && fitted[1] == "?]52;c;aGk=?" && fitted[2] == "?txt");
    }

    #[test]
    fn engine_versions_are_short_and_printable() {
        assert_eq!(check_engine_version("28.5.2+dfsg1"), Ok(()));
        assert_eq!(check_engine_version(""), Ok(()));
        assert!(check_engine_version(&"1".repeat(65)).is_err());
        assert!(check_engine_version("20.10\u{1b}[2J").is_err());
    }
}
