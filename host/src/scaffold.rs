//! `cim-host new EVENT --lang rust|python|js`: writes a handler project for one event that
//! builds outside this repository — the handler source, its build files, the WIT contract
//! (as `cim-host wit` writes it) and a README with the build, check and push commands. The
//! templates are files under `host/templates/`, bundled into the binary.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::handlers::Event;
use crate::runtime::world_of;

/// The wit-bindgen a Rust project depends on: the version `components/Cargo.toml` pins (a
/// test keeps them equal).
pub const WIT_BINDGEN: &str = "0.63";

/// The componentize-py a Python project is built with (PyPI).
pub const COMPONENTIZE_PY: &str = "0.25.0";

/// The componentize-js a JavaScript project is built with (npm).
pub const COMPONENTIZE_JS: &str = "0.23.0";

/// The language of a handler project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    pub const ALL: [Lang; 3] = [Lang::Rust, Lang::Python, Lang::Js];

    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One project file: where it goes and its template text.
type Template = (&'static str, &'static str);

/// The handler source of each event, per language.
fn handler(lang: Lang, event: Event) -> Template {
    macro_rules! by_event {
        ($dest:literal, $dir:literal, $ext:literal) => {
            match event {
                Event::Login => ($dest, include_str!(concat!("../templates/", $dir, "/login.", $ext))),
                Event::Private => ($dest, include_str!(concat!("../templates/", $dir, "/private.", $ext))),
                Event::Group => ($dest, include_str!(concat!("../templates/", $dir, "/group.", $ext))),
                Event::Online => ($dest, include_str!(concat!("../templates/", $dir, "/online.", $ext))),
                Event::Callback => ($dest, include_str!(concat!("../templates/", $dir, "/callback.", $ext))),
            }
        };
    }
    match lang {
        Lang::Rust => by_event!("src/lib.rs", "rust", "rs"),
        Lang::Python => by_event!("app.py", "python", "py"),
        Lang::Js => by_event!("handler.js", "js", "js"),
    }
}

/// The other files of a project in `lang`.
fn project_files(lang: Lang) -> &'static [Template] {
    match lang {
        Lang::Rust => &[
            ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
            (".cargo/config.toml", include_str!("../templates/rust/cargo-config.toml")),
            (".gitignore", include_str!("../templates/rust/gitignore")),
            ("README.md", include_str!("../templates/rust/README.md")),
        ],
        Lang::Python => &[
            (".gitignore", include_str!("../templates/python/gitignore")),
            ("README.md", include_str!("../templates/python/README.md")),
        ],
        Lang::Js => &[
            ("package.json", include_str!("../templates/js/package.json")),
            (".gitignore", include_str!("../templates/js/gitignore")),
            ("README.md", include_str!("../templates/js/README.md")),
        ],
    }
}

/// The id of the default `spin.toml`'s component for `event`: what a push replaces.
pub fn component_id(event: Event) -> &'static str {
    match event {
        Event::Login => "login",
        Event::Private => "private-send",
        Event::Group => "group-send",
        Event::Online => "online-list",
        Event::Callback => "message-callback",
    }
}

/// Where the built component lands, relative to the project directory.
pub fn wasm_path(lang: Lang, name: &str) -> String {
    match lang {
        Lang::Rust => format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_")),
        Lang::Python | Lang::Js => format!("{name}.wasm"),
    }
}

/// The project name when none is given: `group-handler`, `login-handler`, …
pub fn default_name(event: Event) -> String {
    format!("{event}-handler")
}

/// A project name must be a Cargo package name, an npm package name and a file name alike:
/// lowercase ASCII letters, digits, `-` and `_`, starting with a letter.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use lowercase letters, digits, '-' and '_', starting with a letter (at most 64)"
        ))
    }
}

/// The text of `template` for this project: every `{{key}}` replaced.
fn render(template: &str, lang: Lang, event: Event, name: &str) -> String {
    let world = world_of(event).0.trim_start_matches("cim:im/").trim_end_matches("@0.2.0");
    let vars = [
        ("{{name}}", name.to_owned()),
        ("{{event}}", event.to_string()),
        ("{{world}}", world.to_owned()),
        ("{{component}}", component_id(event).to_owned()),
        ("{{wasm}}", wasm_path(lang, name)),
        ("{{wit_bindgen}}", WIT_BINDGEN.to_owned()),
        ("{{componentize_py}}", COMPONENTIZE_PY.to_owned()),
        ("{{componentize_js}}", COMPONENTIZE_JS.to_owned()),
    ];
    vars.iter().fold(template.to_owned(), |text, (key, value)| text.replace(key, value))
}

/// Writes a `lang` project for `event` named `name` into `out`, which must not exist or be
/// an empty directory; returns the files written, relative to `out`.
pub fn create(out: &Path, lang: Lang, event: Event, name: &str) -> anyhow::Result<Vec<PathBuf>> {
    check_name(name).map_err(anyhow::Error::msg)?;
    if out.exists() {
        let mut entries = std::fs::read_dir(out)
            .with_context(|| format!("{} exists and is not a directory", out.display()))?;
        if entries.next().is_some() {
            anyhow::bail!(
                "{} already exists and is not empty: choose another --out, or remove it",
                out.display()
            );
        }
    }
    let mut written = Vec::new();
    let (source, text) = handler(lang, event);
    for (path, template) in std::iter::once(&(source, text)).chain(project_files(lang)) {
        let dest = out.join(path);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&dest, render(template, lang, event, name))
            .with_context(|| format!("writing {}", dest.display()))?;
        written.push(PathBuf::from(path));
    }
    let wit =
        crate::wit::export(&out.join("wit")).with_context(|| format!("writing {}/wit", out.display()))?;
    written.extend(wit.iter().filter_map(|p| p.strip_prefix(out).ok().map(Path::to_path_buf)));
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, file: &str) -> String {
        std::fs::read_to_string(dir.join(file)).unwrap()
    }

    /// Every template of every language and event renders with no placeholder left.
    #[test]
    fn every_project_is_complete() {
        for lang in Lang::ALL {
            for event in Event::ALL {
                let tmp = tempfile::tempdir().unwrap();
                let out = tmp.path().join("p");
                let files = create(&out, lang, event, "my-thing").unwrap();
                // (wit/ is copied as it is: variables.wit shows spin.toml's `{{ name }}`.)
                for file in files.iter().filter(|f| !f.starts_with("wit")) {
                    let text = read(&out, file.to_str().unwrap());
                    assert!(
                        !text.contains("{{"),
                        "{lang} {event}: {} has a placeholder left",
                        file.display()
                    );
                }
                assert_eq!(
                    files.iter().filter(|f| f.starts_with("wit")).count(),
                    crate::wit::FILES.len(),
                    "{lang} {event}"
                );
                let readme = read(&out, "README.md");
                let world = world_of(event).0.trim_start_matches("cim:im/").trim_end_matches("@0.2.0");
                assert!(readme.contains(&format!("--event {event}")), "{lang} {event}: {readme}");
                assert!(
                    readme.contains(&format!(
                        "cim-host push {} {}",
                        component_id(event),
                        wasm_path(lang, "my-thing")
                    )),
                    "{lang} {event}: {readme}"
                );
                let source = match lang {
                    Lang::Rust => read(&out, "src/lib.rs"),
                    Lang::Python => read(&out, "app.py"),
                    Lang::Js => read(&out, "handler.js"),
                };
                assert!(source.contains("my-thing"), "{lang} {event}: the name is in the source's header");
                match lang {
                    Lang::Rust => {
                        assert!(source.contains(&format!("world: \"{world}\"")), "{event}: {source}");
                    }
                    Lang::Python => {
                        assert!(readme.contains(&format!("-w {world} componentize app")), "{readme}")
                    }
                    Lang::Js => {
                        assert!(read(&out, "package.json").contains(&format!("-n {world} ")), "{event}")
                    }
                }
            }
        }
    }

    #[test]
    fn a_rust_project_is_standalone() {
        let tmp = tempfile::tempdir().unwrap();
        let files = create(tmp.path(), Lang::Rust, Event::Private, "pass-through").unwrap();
        let names: Vec<_> = files.iter().map(|p| p.to_str().unwrap().to_owned()).collect();
        for want in ["src/lib.rs", "Cargo.toml", ".cargo/config.toml", "README.md", "wit/worlds.wit"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let cargo = read(tmp.path(), "Cargo.toml");
        assert!(cargo.contains("name = \"pass-through\""), "{cargo}");
        assert!(cargo.contains("crate-type = [\"cdylib\"]"), "{cargo}");
        assert!(!cargo.contains("workspace = true"), "{cargo}");
        assert!(cargo.contains(&format!("wit-bindgen = {{ version = \"{WIT_BINDGEN}\"")), "{cargo}");
        let config = read(tmp.path(), ".cargo/config.toml");
        assert!(config.contains("target = \"wasm32-wasip2\""), "{config}");
        assert!(config.contains("link-arg=-zstack-size=65536"), "{config}");
        let readme = read(tmp.path(), "README.md");
        assert!(readme.contains("target/wasm32-wasip2/release/pass_through.wasm"), "{readme}");
        // The WIT is what `cim-host wit` writes.
        for (name, text) in crate::wit::FILES {
            assert_eq!(&read(tmp.path(), &format!("wit/{name}")), text);
        }
    }

    /// The project builds with the wit-bindgen the repository's components are tested with.
    #[test]
    fn wit_bindgen_is_the_components_pin() {
        let cargo = include_str!("../../components/Cargo.toml");
        let pin = format!("wit-bindgen = {{ version = \"{WIT_BINDGEN}\"");
        assert!(cargo.contains(&pin), "components/Cargo.toml does not pin {pin}");
    }

    #[test]
    fn python_and_js_pin_their_builders() {
        let tmp = tempfile::tempdir().unwrap();
        create(&tmp.path().join("py"), Lang::Python, Event::Group, "g").unwrap();
        let app = read(&tmp.path().join("py"), "app.py");
        assert!(app.contains("class GroupHandler("), "{app}");
        assert!(app.contains("only modules imported at top"), "{app}");
        let readme = read(&tmp.path().join("py"), "README.md");
        assert!(readme.contains(&format!("componentize-py=={COMPONENTIZE_PY}")), "{readme}");

        create(&tmp.path().join("js"), Lang::Js, Event::Group, "g").unwrap();
        let package: serde_json::Value =
            serde_json::from_str(&read(&tmp.path().join("js"), "package.json")).unwrap();
        assert_eq!(package["name"], "g");
        assert_eq!(package["devDependencies"]["@bytecodealliance/componentize-js"], COMPONENTIZE_JS);
        let build = package["scripts"]["build"].as_str().unwrap();
        assert!(build.contains("-d http fetch-event"), "{build}");
        assert!(build.contains("-n group-send") && build.contains("-o g.wasm"), "{build}");
        assert!(read(&tmp.path().join("js"), "handler.js").contains("export const groupHandler"));
    }

    #[test]
    fn refusals() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory with something in it is left alone.
        std::fs::write(tmp.path().join("keep"), "mine").unwrap();
        let e = create(tmp.path(), Lang::Rust, Event::Group, "g").unwrap_err().to_string();
        assert!(e.contains("already exists and is not empty"), "{e}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        // A file is not a directory.
        let e = create(&tmp.path().join("keep"), Lang::Rust, Event::Group, "g").unwrap_err();
        assert!(format!("{e:#}").contains("is not a directory"), "{e:#}");
        // Names that would not make a package.
        for bad in ["", "My-Handler", "9lives", "a b", "../up", "ünï"] {
            let e = create(&tmp.path().join("new"), Lang::Js, Event::Group, bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid name"), "{bad:?}: {e}");
        }
        assert!(!tmp.path().join("new").exists());
        // An empty directory is fine.
        std::fs::create_dir(tmp.path().join("empty")).unwrap();
        create(&tmp.path().join("empty"), Lang::Python, Event::Login, "l").unwrap();
        assert!(tmp.path().join("empty/app.py").exists());
    }
}
