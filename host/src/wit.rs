//! The WIT contract (`cim:im`) bundled into the binary, for `cim-host wit --out DIR`: a
//! handler author gets exactly the contract this host checks components against, without a
//! checkout of the repository.

use std::path::{Path, PathBuf};

/// Every file of `wit/`, by name.
pub const FILES: &[(&str, &str)] = &[
    ("types.wit", include_str!("../../wit/types.wit")),
    ("worlds.wit", include_str!("../../wit/worlds.wit")),
    ("login-handler.wit", include_str!("../../wit/login-handler.wit")),
    ("private-handler.wit", include_str!("../../wit/private-handler.wit")),
    ("group-handler.wit", include_str!("../../wit/group-handler.wit")),
    ("online-handler.wit", include_str!("../../wit/online-handler.wit")),
    ("callback-handler.wit", include_str!("../../wit/callback-handler.wit")),
    ("presence.wit", include_str!("../../wit/presence.wit")),
    ("key-value.wit", include_str!("../../wit/key-value.wit")),
    ("variables.wit", include_str!("../../wit/variables.wit")),
    ("log.wit", include_str!("../../wit/log.wit")),
    ("clock.wit", include_str!("../../wit/clock.wit")),
];

/// Writes the contract into `dir` (created if missing; files of the same name are
/// replaced); returns the paths written.
pub fn export(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    FILES
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to `wit/` but not to [`FILES`] would be missing from every export.
    #[test]
    fn the_bundle_is_the_whole_wit_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wit"))
            .collect();
        on_disk.sort();
        let mut bundled: Vec<String> = FILES.iter().map(|(n, _)| (*n).to_owned()).collect();
        bundled.sort();
        assert_eq!(bundled, on_disk);
        let out = tempfile::tempdir().unwrap();
        let written = export(&out.path().join("wit")).unwrap();
        assert_eq!(written.len(), FILES.len());
        for path in written {
            let name = path.file_name().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(dir.join(name)).unwrap());
        }
    }
}
