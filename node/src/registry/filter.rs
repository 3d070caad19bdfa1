//! MLflow's search filter language, the part the registry and the tracking store answer:
//! clauses joined by `AND`, each `field op value`. Models: `name`, `tags.<key>`; versions also
//! `version_number`, `run_id`, `source_path`; runs `metrics.<key>`, `params.<key>`,
//! `tags.<key>` and the attributes `run_id`, `run_name`, `status`, `user_id`, `start_time`,
//! `end_time`, `artifact_uri` (`attributes.` before them optional); experiments `name`,
//! `tags.<key>`, `creation_time`, `last_update_time`. Keys may be in backticks. Text fields take
//! `= != LIKE ILIKE` (and `IN` for names and run ids), numeric fields `= != < <= > >=`.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Field {
    Name,
    VersionNumber,
    RunId,
    SourcePath,
    Tag(String),
    Metric(String),
    Param(String),
    RunName,
    Status,
    UserId,
    ArtifactUri,
    StartTime,
    EndTime,
    CreationTime,
    LastUpdateTime,
}

impl Field {
    /// Whether the field compares as a number.
    pub fn numeric(&self) -> bool {
        matches!(
            self,
            Self::VersionNumber
                | Self::Metric(_)
                | Self::StartTime
                | Self::EndTime
                | Self::CreationTime
                | Self::LastUpdateTime
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Like,
    ILike,
    In,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(String),
    Number(f64),
    List(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Clause {
    pub field: Field,
    pub op: Op,
    pub value: Value,
}

/// What a clause is tested against: a field's text, or its number for numeric fields; `None`
/// where the subject lacks it.
pub trait Fields {
    fn text(&self, field: &Field) -> Option<&str>;
    fn number(&self, field: &Field) -> Option<f64>;
}

/// A registered model or version, as its searches see it.
pub struct Subject<'a> {
    pub name: &'a str,
    pub version: Option<u32>,
    pub run_id: &'a str,
    pub source: &'a str,
    pub tags: &'a BTreeMap<String, String>,
}

/// Which fields a search accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Models,
    Versions,
    Runs,
    Experiments,
    LoggedModels,
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Text(String),
    Number(f64),
    Op(Op),
    And,
    Open,
    Close,
    Comma,
}

/// Parses a filter; an empty one matches everything.
pub fn parse(filter: &str, kind: Kind) -> Result<Vec<Clause>, String> {
    let tokens = lex(filter)?;
    let mut clauses = Vec::new();
    let mut rest = tokens.as_slice();
    while !rest.is_empty() {
        let (clause, after) = clause(rest, kind)?;
        clauses.push(clause);
        rest = match after {
            [] => after,
            [Token::And, more @ ..] if !more.is_empty() => more,
            [other, ..] => return Err(format!("expected AND between clauses, found {}", show(other))),
        };
    }
    Ok(clauses)
}

fn show(token: &Token) -> String {
    match token {
        Token::Ident(s) => format!("`{s}`"),
        Token::Text(s) => format!("'{s}'"),
        Token::Number(n) => n.to_string(),
        Token::Op(op) => format!("{op:?}"),
        Token::And => "AND".into(),
        Token::Open => "(".into(),
        Token::Close => ")".into(),
        Token::Comma => ",".into(),
    }
}

fn clause(tokens: &[Token], kind: Kind) -> Result<(Clause, &[Token]), String> {
    let [Token::Ident(name), Token::Op(op), rest @ ..] = tokens else {
        return Err(match tokens.first() {
            Some(Token::Ident(name)) => format!("expected an operator after `{name}`"),
            Some(other) => format!("expected a field name, found {}", show(other)),
            None => "expected a clause".into(),
        });
    };
    let field = field(name, kind)?;
    let op = *op;
    let (value, rest) = match (op, rest) {
        (Op::In, [Token::Open, more @ ..]) => {
            let mut items = Vec::new();
            let mut more = more;
            loop {
                match more {
                    [Token::Text(s), Token::Comma, after @ ..] => {
                        items.push(s.clone());
                        more = after;
                    }
                    [Token::Text(s), Token::Close, after @ ..] => {
                        items.push(s.clone());
                        break (Value::List(items), after);
                    }
                    _ => return Err("IN takes a parenthesised list of quoted strings".into()),
                }
            }
        }
        (Op::In, _) => return Err("IN takes a parenthesised list of quoted strings".into()),
        (_, [Token::Text(s), after @ ..]) => (Value::Text(s.clone()), after),
        (_, [Token::Number(n), after @ ..]) => (Value::Number(*n), after),
        (_, _) => return Err(format!("expected a value after `{name}`")),
    };
    let allowed = match &field {
        Field::Name | Field::RunId | Field::RunName => {
            matches!(op, Op::Eq | Op::Ne | Op::Like | Op::ILike | Op::In)
        }
        f if f.numeric() => matches!(op, Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge),
        _ => matches!(op, Op::Eq | Op::Ne | Op::Like | Op::ILike),
    };
    if !allowed {
        return Err(format!("operator {op:?} is not supported for `{name}`"));
    }
    if field.numeric() && !matches!(value, Value::Number(_)) {
        let Value::Text(text) = &value else { return Err(format!("`{name}` takes a number")) };
        let n = text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| !n.is_nan())
            .ok_or_else(|| format!("`{name}` takes a number, not '{text}'"))?;
        return Ok((Clause { field, op, value: Value::Number(n) }, rest));
    }
    if !field.numeric() && matches!(value, Value::Number(_)) {
        return Err(format!("`{name}` takes a quoted string"));
    }
    Ok((Clause { field, op, value }, rest))
}

/// Makes a keyed field (`tags.<key>`, `metrics.<key>`, ...) from its key.
type KeyedField = fn(String) -> Field;

/// Resolves a field name (as a filter or an `order_by` has it) for a search of `kind`.
pub fn field(name: &str, kind: Kind) -> Result<Field, String> {
    let lower = name.to_ascii_lowercase();
    let keyed: &[(&str, KeyedField)] = match kind {
        Kind::Runs | Kind::LoggedModels => &[
            ("tags.", Field::Tag),
            ("tag.", Field::Tag),
            ("metrics.", Field::Metric),
            ("metric.", Field::Metric),
            ("params.", Field::Param),
            ("param.", Field::Param),
            ("parameters.", Field::Param),
        ],
        _ => &[("tags.", Field::Tag), ("tag.", Field::Tag)],
    };
    for (prefix, make) in keyed {
        if lower.starts_with(prefix) {
            let key = name[prefix.len()..].trim_matches('`').trim_matches('"');
            if key.is_empty() {
                return Err(format!("a `{prefix}` filter needs a key"));
            }
            return Ok(make(key.to_owned()));
        }
    }
    let bare = ["attributes.", "attribute.", "attr.", "run."]
        .iter()
        .find_map(|p| lower.strip_prefix(p))
        .filter(|_| matches!(kind, Kind::Runs | Kind::Experiments | Kind::LoggedModels))
        .unwrap_or(&lower);
    match (bare, kind) {
        ("name", Kind::Models | Kind::Versions | Kind::Experiments) => Ok(Field::Name),
        ("version_number", Kind::Versions) => Ok(Field::VersionNumber),
        ("run_id", Kind::Versions | Kind::Runs) => Ok(Field::RunId),
        ("source_path", Kind::Versions) => Ok(Field::SourcePath),
        ("run_name", Kind::Runs) => Ok(Field::RunName),
        ("status", Kind::Runs) => Ok(Field::Status),
        ("user_id", Kind::Runs) => Ok(Field::UserId),
        ("artifact_uri", Kind::Runs) => Ok(Field::ArtifactUri),
        ("start_time" | "created", Kind::Runs) => Ok(Field::StartTime),
        ("end_time", Kind::Runs) => Ok(Field::EndTime),
        ("creation_time", Kind::Experiments) => Ok(Field::CreationTime),
        ("last_update_time", Kind::Experiments) => Ok(Field::LastUpdateTime),
        ("name", Kind::LoggedModels) => Ok(Field::Name),
        ("source_run_id", Kind::LoggedModels) => Ok(Field::RunId),
        ("creation_timestamp" | "creation_time", Kind::LoggedModels) => Ok(Field::CreationTime),
        ("last_updated_timestamp" | "last_update_time", Kind::LoggedModels) => Ok(Field::LastUpdateTime),
        _ => Err(format!(
            "invalid filter field `{name}`; expected {}",
            match kind {
                Kind::Models => "name or tags.<key>",
                Kind::Versions => "name, version_number, run_id, source_path or tags.<key>",
                Kind::Runs => {
                    "metrics.<key>, params.<key>, tags.<key>, or one of run_id, run_name, status, user_id, \
                     start_time, end_time, artifact_uri"
                }
                Kind::Experiments => "name, tags.<key>, creation_time or last_update_time",
                Kind::LoggedModels => {
                    "name, source_run_id, params.<key>, tags.<key>, creation_timestamp or last_updated_timestamp"
                }
            }
        )),
    }
}

fn lex(input: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = input.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            ',' => {
                tokens.push(Token::Comma);
                i += 1;
            }
            '=' => {
                tokens.push(Token::Op(Op::Eq));
                i += 1;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                tokens.push(Token::Op(Op::Ne));
                i += 2;
            }
            '<' | '>' => {
                let eq = chars.get(i + 1) == Some(&'=');
                tokens.push(Token::Op(match (c, eq) {
                    ('<', false) => Op::Lt,
                    ('<', true) => Op::Le,
                    ('>', false) => Op::Gt,
                    _ => Op::Ge,
                }));
                i += 1 + usize::from(eq);
            }
            '\'' | '"' => {
                let quote = c;
                let mut text = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string in filter".into()),
                        Some(&q) if q == quote && chars.get(i + 1) == Some(&quote) => {
                            text.push(quote);
                            i += 2;
                        }
                        Some(&q) if q == quote => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            text.push(other);
                            i += 1;
                        }
                    }
                }
                tokens.push(Token::Text(text));
            }
            '-' | '.' | '0'..='9' => {
                let start = i;
                i += 1;
                while i < chars.len() {
                    let c = chars[i];
                    let exponent_sign = matches!(c, '+' | '-') && matches!(chars[i - 1], 'e' | 'E');
                    if !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E') || exponent_sign) {
                        break;
                    }
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                tokens
                    .push(Token::Number(text.parse().map_err(|_| format!("bad number `{text}` in filter"))?));
            }
            '`' | 'a'..='z' | 'A'..='Z' | '_' => {
                let start = i;
                let mut in_ticks = false;
                while i < chars.len() {
                    let c = chars[i];
                    if c == '`' {
                        in_ticks = !in_ticks;
                    } else if !(in_ticks || c.is_alphanumeric() || c == '_' || c == '.') {
                        break;
                    }
                    i += 1;
                }
                if in_ticks {
                    return Err("unterminated backtick in filter".into());
                }
                let word: String = chars[start..i].iter().collect();
                let word = word.replace('`', "");
                tokens.push(match word.to_ascii_uppercase().as_str() {
                    "AND" => Token::And,
                    "LIKE" => Token::Op(Op::Like),
                    "ILIKE" => Token::Op(Op::ILike),
                    "IN" => Token::Op(Op::In),
                    "OR" => return Err("OR is not supported in filters; use AND or IN".into()),
                    _ => Token::Ident(word),
                });
            }
            other => return Err(format!("unexpected character `{other}` in filter")),
        }
    }
    Ok(tokens)
}

impl Fields for Subject<'_> {
    fn text(&self, field: &Field) -> Option<&str> {
        match field {
            Field::Name => Some(self.name),
            Field::RunId => Some(self.run_id),
            Field::SourcePath => Some(self.source),
            Field::Tag(key) => self.tags.get(key).map(String::as_str),
            _ => None,
        }
    }

    fn number(&self, field: &Field) -> Option<f64> {
        match field {
            Field::VersionNumber => self.version.map(f64::from),
            _ => None,
        }
    }
}

/// Whether `subject` satisfies every clause.
pub fn matches<S: Fields + ?Sized>(clauses: &[Clause], subject: &S) -> bool {
    clauses.iter().all(|c| test(c, subject))
}

fn test<S: Fields + ?Sized>(clause: &Clause, s: &S) -> bool {
    if clause.field.numeric() {
        // a subject without the number (a run that never logged the metric) matches nothing
        let (Some(v), Value::Number(n)) = (s.number(&clause.field), &clause.value) else { return false };
        return match clause.op {
            Op::Eq => v == *n,
            Op::Ne => v != *n,
            Op::Lt => v < *n,
            Op::Le => v <= *n,
            Op::Gt => v > *n,
            Op::Ge => v >= *n,
            _ => false,
        };
    }
    let Some(text) = s.text(&clause.field) else {
        // A missing tag differs from every value and matches nothing else.
        return clause.op == Op::Ne;
    };
    match (&clause.value, clause.op) {
        (Value::Text(v), Op::Eq) => text == v,
        (Value::Text(v), Op::Ne) => text != v,
        (Value::Text(v), Op::Like) => like(text, v, false),
        (Value::Text(v), Op::ILike) => like(text, v, true),
        (Value::List(items), Op::In) => items.iter().any(|i| i == text),
        _ => false,
    }
}

/// SQL LIKE: `%` any run, `_` any one character.
fn like(text: &str, pattern: &str, fold: bool) -> bool {
    let (text, pattern) =
        if fold { (text.to_lowercase(), pattern.to_lowercase()) } else { (text.into(), pattern.into()) };
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    // Greedy matching with backtracking to the last `%`.
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '%')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(tags: &'a BTreeMap<String, String>) -> Subject<'a> {
        Subject { name: "Fraud-Model", version: Some(3), run_id: "r1", source: "s3://b/m", tags }
    }

    #[test]
    fn parses_and_matches_what_the_client_sends() {
        let mut tags = BTreeMap::new();
        tags.insert("team".to_owned(), "risk".to_owned());
        let s = subject(&tags);
        let yes = [
            "",
            "name = 'Fraud-Model'",
            "name LIKE 'Fraud%'",
            "name ILIKE 'fraud-%'",
            "name IN ('a', 'Fraud-Model')",
            "tags.team = 'risk' AND name != 'x'",
            "tag.`team` LIKE 'ri_k'",
            "name = 'Fraud-Model' AND tag.`mlflow.prompt.is_prompt` != 'true'",
            "version_number >= 2 AND version_number = '3'",
            "run_id = \"r1\" and source_path LIKE 's3://%'",
        ];
        for f in yes {
            let clauses = parse(f, Kind::Versions).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(matches(&clauses, &s), "{f} should match");
        }
        let no = [
            "name = 'fraud-model'",
            "name LIKE 'Fraud'",
            "tags.team = 'ops'",
            "tags.other = 'x'",
            "version_number < 3",
        ];
        for f in no {
            assert!(!matches(&parse(f, Kind::Versions).unwrap(), &s), "{f} should not match");
        }
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (f, kind, says) in [
            ("name = ", Kind::Versions, "expected a value"),
            ("nome = 'x'", Kind::Versions, "invalid filter field"),
            ("run_id = 'x'", Kind::Models, "invalid filter field"),
            ("name = 'x' OR name = 'y'", Kind::Versions, "OR is not supported"),
            ("name = 'x' name = 'y'", Kind::Versions, "expected AND"),
            ("name IN 'x'", Kind::Versions, "parenthesised"),
            ("name = 'x", Kind::Versions, "unterminated"),
            ("version_number LIKE 'x'", Kind::Versions, "not supported"),
        ] {
            let err = parse(f, kind).unwrap_err();
            assert!(err.contains(says), "{f}: {err}");
        }
    }

    #[test]
    fn like_handles_runs_and_single_characters() {
        assert!(like("abcabc", "%abc", false));
        assert!(like("abc", "a%c", false));
        assert!(like("ac", "a%c", false));
        assert!(!like("ab", "a_c", false));
        assert!(like("ABC", "a_c", true));
        assert!(like("", "%", false));
        assert!(!like("", "_", false));
    }
}
