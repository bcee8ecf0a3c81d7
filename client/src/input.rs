//! What a line typed into the `cim` terminal client means.

/// One line of terminal input, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A blank line: ignored.
    Empty,
    /// `:q`
    Quit,
    /// `:olu`
    OnlineUsers,
    /// `:all` (or `:help`)
    Help,
    /// `:history [N]`: the last N messages (None: the default count).
    History(Option<usize>),
    /// `ID;;text`
    Private { to: u64, text: String },
    /// Any other line.
    Group(String),
    /// `:word` that is not a command (so that a typo is not sent to everyone).
    Unknown(String),
}

/// The commands, one per line, as `:all` prints them.
pub const COMMANDS: &str = "\
:q           quit
:olu         list the online users (<id> <name>)
:all, :help  list these commands
:history [N] show your last N messages (default 20), private and group, oldest first
ID;;text     send text to user ID only
text         send text to every online user";

/// Parses one line (without its line break; a trailing `\r` is ignored).
pub fn parse_line(line: &str) -> Input {
    let line = line.trim_end_matches(['\r', '\n']);
    let trimmed = line.trim();
    match trimmed {
        "" => return Input::Empty,
        ":q" => return Input::Quit,
        ":olu" => return Input::OnlineUsers,
        ":all" | ":help" => return Input::Help,
        _ => {}
    }
    if let Some(rest) = trimmed.strip_prefix(":history") {
        match rest.trim() {
            "" => return Input::History(None),
            n if rest.starts_with(char::is_whitespace) => {
                if let Ok(n @ 1..) = n.parse::<usize>() {
                    return Input::History(Some(n));
                }
                return Input::Unknown(trimmed.to_owned());
            }
            _ => {}
        }
    }
    if let Some(word) = trimmed.strip_prefix(':')
        && !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphabetic())
    {
        return Input::Unknown(trimmed.to_owned());
    }
    if let Some((to, text)) = line.split_once(";;")
        && let Ok(to) = to.trim().parse::<u64>()
    {
        return Input::Private { to, text: text.to_owned() };
    }
    Input::Group(line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse_line(":q"), Input::Quit);
        assert_eq!(parse_line(" :olu \r"), Input::OnlineUsers);
        assert_eq!(parse_line(":all"), Input::Help);
        assert_eq!(parse_line(":help"), Input::Help);
        assert_eq!(parse_line(":quit"), Input::Unknown(":quit".into()));
        assert_eq!(parse_line(":history"), Input::History(None));
        assert_eq!(parse_line(" :history 10 "), Input::History(Some(10)));
        assert_eq!(parse_line(":history 0"), Input::Unknown(":history 0".into()));
        assert_eq!(parse_line(":history ten"), Input::Unknown(":history ten".into()));
        assert_eq!(parse_line(":historyx"), Input::Unknown(":historyx".into()));
        assert_eq!(parse_line(""), Input::Empty);
        assert_eq!(parse_line("   \r\n"), Input::Empty);
    }

    #[test]
    fn private_messages_need_a_numeric_id() {
        assert_eq!(parse_line("2;;hi there"), Input::Private { to: 2, text: "hi there".into() });
        assert_eq!(parse_line("2;;a;;b"), Input::Private { to: 2, text: "a;;b".into() });
        assert_eq!(parse_line("2;;"), Input::Private { to: 2, text: String::new() });
        assert_eq!(parse_line("bob;;hi"), Input::Group("bob;;hi".into()));
    }

    #[test]
    fn everything_else_is_a_group_message() {
        assert_eq!(parse_line("hello all\r"), Input::Group("hello all".into()));
        assert_eq!(parse_line(":)"), Input::Group(":)".into()));
        assert_eq!(parse_line("  indented"), Input::Group("  indented".into()));
    }
}
