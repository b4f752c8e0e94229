//! How a blob is cut into parts: one rule for the coordinator that plans, the worker that
//! uploads, and the restore that reads ranges aligned to the stored parts.

const MIB: u64 = 1024 * 1024;
/// The smallest part the coordinator plans: S3 allows 5 MiB, transfer managers converge on 8.
pub const MIN_PART_SIZE: u64 = 8 * MIB;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// S3 allows 10,000 parts; staying under 9,000 leaves room for a store with a lower cap.
pub const MAX_PARTS: u64 = 9_000;
/// The largest blob the rule can cut: 9,000 parts of 5 GiB (about 44 TiB).
pub const MAX_BLOB_SIZE: u64 = MAX_PARTS * MAX_PART_SIZE;

/// The part size of a blob of `blob_size` bytes under a plan's `planned` part size: the planned
/// size (at least [`MIN_PART_SIZE`]), grown in whole MiB until the blob has at most
/// [`MAX_PARTS`] parts, and never above [`MAX_PART_SIZE`] (a blob over [`MAX_BLOB_SIZE`] cannot
/// be stored; callers refuse it first).
pub fn part_size_for(blob_size: u64, planned: u64) -> u64 {
    let needed = blob_size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    planned.clamp(MIN_PART_SIZE, MAX_PART_SIZE).max(needed).min(MAX_PART_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blobs_use_the_planned_size_and_never_less_than_the_minimum() {
        assert_eq!(part_size_for(100 * MIB, 16 * MIB), 16 * MIB);
        assert_eq!(part_size_for(100 * MIB, 1), MIN_PART_SIZE);
        assert_eq!(part_size_for(0, 0), MIN_PART_SIZE);
        assert_eq!(part_size_for(1, u64::MAX), MAX_PART_SIZE);
    }

    #[test]
    fn big_blobs_grow_their_parts_to_stay_under_the_part_limit() {
        for size in [8 * MIB * 9_000, 8 * MIB * 9_000 + 1, 100 * 1024 * MIB, 1024 * 1024 * MIB, MAX_BLOB_SIZE] {
            let part = part_size_for(size, 8 * MIB);
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size} bytes in parts of {part}");
            assert!((MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part));
            assert_eq!(part % MIB, 0);
        }
        // Exactly at the edge: 9,000 parts of 8 MiB stay at 8 MiB, one byte more grows to 9 MiB.
        assert_eq!(part_size_for(8 * MIB * 9_000, 8 * MIB), 8 * MIB);
        assert_eq!(part_size_for(8 * MIB * 9_000 + 1, 8 * MIB), 9 * MIB);
    }
}
