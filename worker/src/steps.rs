//! Honest hit rates: which build steps of a saved image the build reused. A step is an entry
//! of the image's history after its final stage's `FROM` (empty-layer steps included); the
//! build reused it when its instruction, its layer's size and its recorded creation time are
//! those of the same step of the image the cache held for the key (a step rebuilt to the same
//! bytes was still rebuilt: its time is new). Counting stops at the first rebuilt step, whose
//! reason is named: its files, its instruction, the base image, or nothing restored here.

use proto::v1 as pb;

use crate::docker::{Engine, EngineError, EngineImage};

/// A named image's steps and base, as the save records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSteps {
    /// How the save named it (`app:latest`).
    pub reference: String,
    pub id: String,
    pub steps: Vec<pb::Step>,
    pub base: String,
    pub base_id: String,
}

/// The steps an image records most: the coordinator's bound (the latest kept).
const MOST_STEPS: usize = 1000;

/// Reads `image`'s steps after its base from the engine.
pub async fn of_image(engine: &Engine, reference: &str, image: &EngineImage) -> Result<ImageSteps, EngineError> {
    let history = engine.history(&image.id).await?;
    let (base, base_id, from) = engine.base_of(&image.id, &image.diff_ids, &history).await?.unwrap_or_default();
    let steps = &history[from.max(history.len().saturating_sub(MOST_STEPS))..];
    Ok(ImageSteps { reference: reference.to_owned(), id: image.id.clone(), steps: steps.to_vec(), base, base_id })
}

impl ImageSteps {
    /// Records the steps on the save's image of the same ID.
    pub fn attach(&self, images: &mut [pb::Image]) {
        for image in images.iter_mut().filter(|image| image.id == self.id) {
            image.steps = self.steps.clone();
            image.base = self.base.clone();
            image.base_id = self.base_id.clone();
        }
    }

    /// The image of the key's cache this one is compared with: the one with its tag, else
    /// (a single named image) the only one recording steps.
    pub fn previous<'a>(&self, previous: &'a [pb::Image]) -> Option<&'a pb::Image> {
        previous
            .iter()
            .find(|image| image.repo_tags.contains(&self.reference) || image.id == self.reference)
            .or_else(|| if previous.len() == 1 { previous.first() } else { None })
    }
}

/// How many of an image's steps the build reused, and why the first rebuilt one was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reuse {
    pub reused: usize,
    pub steps: usize,
    /// The first rebuilt step: its number (from 1), instruction and why.
    pub first_rebuilt: Option<(usize, String, String)>,
}

impl Reuse {
    /// `app:latest: reused 2 of 5 steps; first rebuilt: step 3 COPY … (its files changed)`.
    pub fn line(&self, reference: &str) -> String {
        let mut line = format!("{reference}: reused {} of {} steps", self.reused, self.steps);
        if let Some((number, instruction, why)) = &self.first_rebuilt {
            line.push_str(&format!("; first rebuilt: step {number} {instruction} ({why})"));
        }
        line
    }
}

/// An instruction as people write it: `COPY file:… in /f`, `RUN make`, `ENV A=b`, at most 60
/// characters.
pub fn display(instruction: &str) -> String {
    let mut text = instruction.trim();
    text = text.strip_suffix("# buildkit").map_or(text, str::trim_end);
    let text = if let Some(rest) = text.strip_prefix("/bin/sh -c #(nop)") {
        rest.trim().to_owned()
    } else if let Some(rest) = text.strip_prefix("/bin/sh -c ") {
        format!("RUN {}", rest.trim())
    } else {
        text.replacen("RUN /bin/sh -c ", "RUN ", 1)
    };
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| match sources_hash(word) {
            Some((kind, hash)) => format!("{kind}:{}", hash.get(..12).unwrap_or(hash)),
            None => word.to_owned(),
        })
        .collect();
    let text = words.join(" ");
    match text.char_indices().nth(60) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// The classic builder names a `COPY`'s or `ADD`'s sources by their hash: `file:<hex>`.
fn sources_hash(word: &str) -> Option<(&str, &str)> {
    let (kind, hash) = word.split_once(':')?;
    (["file", "dir", "multi"].contains(&kind) && hash.len() >= 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((kind, hash))
}

/// An instruction with its sources' hashes left out.
fn without_sources(instruction: &str) -> String {
    let words =
        instruction.split_whitespace().map(|word| if sources_hash(word).is_some() { "<sources>" } else { word });
    words.collect::<Vec<_>>().join(" ")
}

fn copies_files(instruction: &str) -> bool {
    let shown = display(instruction);
    shown.starts_with("COPY ") || shown.starts_with("ADD ")
}

/// Compares `current` with `previous`, the image the key's cache held (`None`: it held none);
/// `restored_here`: that image is on this host (restored, or built here; the containerd store
/// forgets an image once a rebuild takes its tag, so a reused step also says so).
pub fn compare(current: &ImageSteps, previous: Option<&pb::Image>, restored_here: bool) -> Reuse {
    let steps = current.steps.len();
    let first = |number: usize, why: String| {
        let instruction = current.steps.get(number).map(|step| display(&step.instruction)).unwrap_or_default();
        Reuse { reused: number, steps, first_rebuilt: (number < steps).then(|| (number + 1, instruction, why)) }
    };
    let Some(previous) = previous else {
        return first(0, "the cache held no image for this key".into());
    };
    if !current.base_id.is_empty() && !previous.base_id.is_empty() && current.base_id != previous.base_id {
        let short = current.base_id.trim_start_matches("sha256:").get(..12).unwrap_or(&current.base_id).to_owned();
        return first(0, format!("the base image moved: {} is now sha256:{short}", current.base));
    }
    let reused = current.steps.iter().zip(&previous.steps).take_while(|(now, before)| now == before).count();
    let Some(before) = previous.steps.get(reused) else {
        return first(reused, "the cache held no such step".into());
    };
    let now = &current.steps.get(reused).cloned().unwrap_or_default();
    // A COPY or ADD of the same sources' names whose hash or size moved read other files; so
    // did one rebuilt after steps the build did reuse (the cache was in use, and a COPY's key is
    // its files). Nothing reused and the cached image absent: it was never restored here.
    let why = if copies_files(&now.instruction)
        && without_sources(&now.instruction) == without_sources(&before.instruction)
        && (now.instruction != before.instruction || now.size != before.size || reused > 0)
    {
        "its files changed"
    } else if now.instruction != before.instruction {
        "the instruction changed"
    } else if !restored_here && reused == 0 {
        "nothing was restored on this host"
    } else {
        "unchanged, but the build did not use the restored cache"
    };
    first(reused, why.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(instruction: &str, created_unix: i64, size: u64) -> pb::Step {
        pb::Step { instruction: instruction.into(), created_unix, size }
    }

    /// The seed's five steps after `FROM base:1`, by the classic builder, made at `t`, the
    /// COPY's file of hash `hash`.
    fn seed(t: i64, copy_at: i64, hash: &str) -> Vec<pb::Step> {
        vec![
            step("/bin/sh -c echo one > /one", t, 4),
            step("/bin/sh -c echo two > /two", t + 1, 4),
            step(&format!("/bin/sh -c #(nop) COPY file:{hash} in /f "), copy_at, 6),
            step("/bin/sh -c #(nop)  ENV A=b", copy_at + 1, 0),
            step("/bin/sh -c echo three > /three", copy_at + 2, 6),
        ]
    }

    fn image(steps: Vec<pb::Step>, base_id: &str) -> ImageSteps {
        ImageSteps {
            reference: "app:latest".into(),
            id: "sha256:app".into(),
            steps,
            base: "base:1".into(),
            base_id: base_id.into(),
        }
    }

    fn held(steps: Vec<pb::Step>, base_id: &str) -> pb::Image {
        pb::Image { repo_tags: vec!["app:latest".into()], steps, base_id: base_id.into(), ..Default::default() }
    }

    #[test]
    fn a_changed_file_rebuilds_from_its_copy() {
        let hash = "a".repeat(64);
        let before = held(seed(100, 102, &hash), "sha256:base");
        let now = image(seed(100, 500, &"b".repeat(64)), "sha256:base");
        let reuse = compare(&now, Some(&before), true);
        assert_eq!((reuse.reused, reuse.steps), (2, 5));
        assert_eq!(
            reuse.line("app:latest"),
            "app:latest: reused 2 of 5 steps; first rebuilt: step 3 COPY file:bbbbbbbbbbbb in /f (its files changed)"
        );
        let unchanged = compare(&image(seed(100, 102, &hash), "sha256:base"), Some(&before), true);
        assert_eq!(unchanged.line("app:latest"), "app:latest: reused 5 of 5 steps");
    }

    #[test]
    fn each_cause_of_a_first_miss_is_named() {
        let hash = "a".repeat(64);
        let before = held(seed(100, 102, &hash), "sha256:base");
        let reason = |reuse: Reuse| reuse.first_rebuilt.map(|(n, _, why)| (n, why)).unwrap();
        // The base moved: nothing is reused, whatever the steps say.
        let moved = compare(&image(seed(900, 902, &hash), &format!("sha256:{}", "c".repeat(64))), Some(&before), true);
        assert_eq!(reason(moved), (1, "the base image moved: base:1 is now sha256:cccccccccccc".into()));
        // An instruction edited.
        let mut edited = seed(100, 102, &hash);
        edited[1] = step("/bin/sh -c echo TWO > /two", 700, 4);
        assert_eq!(
            reason(compare(&image(edited, "sha256:base"), Some(&before), true)),
            (2, "the instruction changed".into())
        );
        // The same steps made anew: on this host nothing was restored, or the build ignored it.
        let anew = image(seed(800, 802, &hash), "sha256:base");
        assert_eq!(reason(compare(&anew, Some(&before), false)), (1, "nothing was restored on this host".into()));
        let ignored = compare(&anew, Some(&before), true);
        assert_eq!(reason(ignored), (1, "unchanged, but the build did not use the restored cache".into()));
        // No cache yet; a step the cache did not have.
        assert_eq!(reason(compare(&anew, None, false)), (1, "the cache held no image for this key".into()));
        let mut longer = seed(100, 102, &hash);
        longer.push(step("/bin/sh -c echo four", 990, 1));
        let reuse = compare(&image(longer, "sha256:base"), Some(&before), true);
        assert_eq!((reuse.reused, reason(reuse)), (5, (6, "the cache held no such step".into())));
    }

    #[test]
    fn buildkit_instructions_read_as_written() {
        assert_eq!(display("COPY f /f # buildkit"), "COPY f /f");
        assert_eq!(display("RUN /bin/sh -c echo one > /one # buildkit"), "RUN echo one > /one");
        assert_eq!(display("ENV A=b"), "ENV A=b");
        assert_eq!(display("/bin/sh -c #(nop)  ENV A=b"), "ENV A=b");
        assert!(display(&format!("RUN {}", "x".repeat(100))).ends_with('…'));
        // A BuildKit COPY names no hash: a changed file shows in its layer's size, or in its
        // being rebuilt after steps the build reused.
        let steps = |copy_at: i64| {
            vec![step("RUN /bin/sh -c echo one # buildkit", 50, 4), step("COPY f /f # buildkit", copy_at, 6)]
        };
        let before_two = held(steps(100), "");
        let reuse = compare(&image(steps(300), ""), Some(&before_two), false);
        assert_eq!((reuse.reused, reuse.first_rebuilt.unwrap().2), (1, "its files changed".to_string()));
        let before = held(vec![step("COPY f /f # buildkit", 100, 6)], "");
        let now = image(vec![step("COPY f /f # buildkit", 200, 9)], "");
        assert_eq!(compare(&now, Some(&before), true).first_rebuilt.unwrap().2, "its files changed");
    }
}
