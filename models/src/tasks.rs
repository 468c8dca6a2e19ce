//! Task names: the 20 CelebA attributes of the paper's Table 3, and name checks.

use crate::{Error, Result};

/// The 20 face attributes of the paper's Table 3, in its order, spelled as in
/// CelebA's `list_attr_celeba.txt` header (lower case).
pub const CELEBA_20: [&str; 20] = [
    "smiling",
    "5_o_clock_shadow",
    "bald",
    "arched_eyebrows",
    "chubby",
    "double_chin",
    "high_cheekbones",
    "goatee",
    "mustache",
    "no_beard",
    "sideburns",
    "bangs",
    "straight_hair",
    "wavy_hair",
    "receding_hairline",
    "bags_under_eyes",
    "bushy_eyebrows",
    "young",
    "oval_face",
    "mouth_slightly_open",
];

/// The longest task name (CelebA's longest is 19 characters).
pub const MAX_NAME: usize = 64;

/// Checks a task name: 1 to [`MAX_NAME`] ASCII letters, digits and `_` (it
/// becomes part of tensor names and file names).
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(Error::InvalidTaskName { name: name.into() });
    }
    Ok(())
}

/// Checks the attribute names of a label file's header: each a valid task name
/// ([`check_name`]) and none twice in any case. The error is the message for the
/// file's header line.
pub fn check_header(names: &[String]) -> std::result::Result<(), String> {
    check_list(names).map_err(|e| match e {
        Error::DuplicateTask { name } => {
            format!("the header names {name:?} twice (in any case); name each attribute once")
        }
        e => e.to_string(),
    })
}

/// Checks the task list a checkpoint or package carries: valid names, none
/// twice in any case.
pub fn check_list(tasks: &[String]) -> Result<()> {
    for (i, t) in tasks.iter().enumerate() {
        check_name(t)?;
        if tasks[..i].iter().any(|u| u.eq_ignore_ascii_case(t)) {
            return Err(Error::DuplicateTask { name: t.clone() });
        }
    }
    Ok(())
}

/// A task name as asked for on a command line, spaces around it dropped
/// (`--task "smiling, young"`); an empty one (`smiling,`) is [`Error::EmptyTask`].
pub fn asked(name: &str) -> Result<&str> {
    match name.trim() {
        "" => Err(Error::EmptyTask),
        name => Ok(name),
    }
}

/// Resolves `wanted` (case-insensitive, spaces around a name dropped) against
/// `available`, returning indices into `available` in the order asked, or
/// [`Error::UnknownTask`] listing what exists. A task asked for twice, in any
/// spelling, is [`Error::DuplicateTask`]; an empty name, [`Error::EmptyTask`].
pub fn select(wanted: &[String], available: &[String]) -> Result<Vec<usize>> {
    let mut picked: Vec<usize> = Vec::with_capacity(wanted.len());
    for w in wanted {
        let w = asked(w)?;
        let i = available
            .iter()
            .position(|a| a.eq_ignore_ascii_case(w))
            .ok_or_else(|| Error::UnknownTask {
                name: w.to_string(),
                available: available.to_vec(),
            })?;
        if picked.contains(&i) {
            return Err(Error::DuplicateTask {
                name: available[i].clone(),
            });
        }
        picked.push(i);
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_is_case_insensitive_and_lists_available_on_error() {
        let avail: Vec<String> = CELEBA_20.iter().map(|s| s.to_string()).collect();
        let idx = select(&["Young".into(), "smiling".into()], &avail).expect("select");
        assert_eq!(idx, vec![17, 0]);
        let err = select(&["smile".into()], &avail).unwrap_err().to_string();
        assert!(
            err.contains("\"smile\"") && err.contains("smiling, 5_o_clock_shadow"),
            "{err}"
        );
        let err = select(&["young".into(), "Young".into()], &avail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"young\" is asked for twice"), "{err}");
        // Spaces around a name are dropped; an empty name is named as such.
        let idx = select(&["smiling".into(), " young ".into()], &avail).expect("spaces");
        assert_eq!(idx, vec![0, 17]);
        let err = select(&["smiling".into(), "".into()], &avail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty task name") && err.contains("comma"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_names() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_header(&names(&["smiling", "young"])).is_ok());
        let err = check_header(&names(&["smiling", "Smiling"])).unwrap_err();
        assert!(err.contains("names \"Smiling\" twice"), "{err}");
        let err = check_header(&names(&["mat.erial"])).unwrap_err();
        assert!(err.contains("invalid task name \"mat.erial\""), "{err}");
        assert!(check_name("no_beard").is_ok());
        assert!(check_name("heel height").is_err());
        assert!(check_name("").is_err());
    }
}
