//! `cim-host new EVENT --lang LANG`: the command line around [`cim_host::scaffold`].

use std::path::PathBuf;

use cim_host::handlers::Event;
use cim_host::scaffold::{self, Lang};
use clap::Args;

/// The arguments of `cim-host new` (its help is the `New` command's doc comment).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  cim-host new group --lang rust --out word-guard\n  \
                        cim-host new login --lang python --name allow-staff\n  \
                        cim-host new private --lang js")]
pub struct NewArgs {
    /// The event the handler decides on: login, private, group, online or callback.
    #[arg(value_parser = super::parse_event)]
    event: Event,
    /// The language: rust (cargo, wit-bindgen), python (componentize-py) or js
    /// (componentize-js).
    #[arg(long, value_parser = parse_lang)]
    lang: Lang,
    /// Where to write the project; must not exist or be empty [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The project's name (the Cargo or npm package, the .wasm file): lowercase letters,
    /// digits, '-' and '_' [default: EVENT-handler].
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
}

pub fn new(args: NewArgs) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(|| scaffold::default_name(args.event));
    let out = args.out.unwrap_or_else(|| PathBuf::from(&name));
    let files = scaffold::create(&out, args.lang, args.event, &name)?;
    println!(
        "wrote {} files of the {} {} handler `{name}` to {}; see {}",
        files.len(),
        args.lang,
        args.event,
        out.display(),
        out.join("README.md").display()
    );
    Ok(())
}

fn parse_lang(s: &str) -> Result<Lang, String> {
    Lang::ALL
        .into_iter()
        .find(|l| l.as_str() == s)
        .ok_or_else(|| "expected one of rust, python, js".to_owned())
}

fn parse_name(s: &str) -> Result<String, String> {
    scaffold::check_name(s).map(|()| s.to_owned())
}
