//! The CLIP tokenizer, from the `tokenizer/` folder of a Stable Diffusion checkpoint.
//!
//! Those folders ship the BPE files `vocab.json` and `merges.txt` (and `tokenizer_config.json`), usually
//! without a `tokenizer.json`; the `tokenizers` crate builds the same BPE from the two files. CLIP's text
//! pipeline around it: NFC, whitespace collapsed, lower case, split by CLIP's pattern, byte-level
//! alphabet, `</w>` ending each word; then start and end tokens, truncation and padding to the text
//! encoder's context length.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::EngineError;

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
/// CLIP's word pattern (what a "word" is before BPE).
const PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    start: u32,
    end: u32,
    pad: u32,
    max_len: usize,
}

impl ClipTokenizer {
    /// Loads `dir/vocab.json` and `dir/merges.txt`; the padding token comes from
    /// `tokenizer_config.json` (`pad_token`: `<|endoftext|>` for SD 1.x, `!` for SD 2.x), and `max_len` is
    /// the text encoder's context length (77).
    pub fn load(dir: &Path, max_len: usize) -> Result<ClipTokenizer, EngineError> {
        let invalid = |path: &Path, why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
        let (vocab, builder) = match existing(dir.join("vocab.json")) {
            Ok(vocab) => {
                let merges = existing(dir.join("merges.txt"))?;
                let builder = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy());
                (vocab, builder)
            }
            // transformers 5 saves only `tokenizer.json`, whose model holds the same vocabulary and merges.
            Err(missing) => match existing(dir.join("tokenizer.json")) {
                Ok(file) => {
                    let (vocab, merges) = read_tokenizer_json(&file)?;
                    (file, BPE::builder().vocab_and_merges(vocab, merges))
                }
                Err(_) => return Err(missing),
            },
        };
        let bpe = builder
            .unk_token(END.to_owned())
            .end_of_word_suffix("</w>".to_owned())
            .build()
            .map_err(|e| invalid(&vocab, e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let internal = |e: tokenizers::Error| invalid(dir, e.to_string());
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::from(NFC),
            NormalizerWrapper::from(
                Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                    .map_err(internal)?,
            ),
            NormalizerWrapper::from(Lowercase),
        ]);
        inner.with_normalizer(Some(normalizer));
        let split =
            Split::new(SplitPattern::Regex(PATTERN.into()), SplitDelimiterBehavior::Removed, true).map_err(internal)?;
        inner.with_pre_tokenizer(Some(PreSequence::new(vec![
            PreTokenizerWrapper::from(split),
            PreTokenizerWrapper::from(ByteLevel::new(false, true, false)),
        ])));

        let id = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| invalid(&vocab, format!("the vocabulary has no '{token}'")))
        };
        let (start, end) = (id(START)?, id(END)?);
        let pad_token = pad_token(dir)?.unwrap_or_else(|| END.to_owned());
        let pad = id(&pad_token)?;
        // transformers splits the special tokens out of the text before anything else, and each is its
        // own id wherever it is typed: with SD 2.x's pad token `!`, "otter!" is `otter</w>` then the
        // bare `!` (not `!</w>`).
        let specials: Vec<AddedToken> =
            [START, END, pad_token.as_str()].into_iter().map(|t| AddedToken::from(t.to_owned(), true)).collect();
        inner.add_special_tokens(&specials);
        if max_len < 2 {
            return Err(invalid(dir, format!("a context of {max_len} tokens cannot hold the start and end tokens")));
        }
        Ok(ClipTokenizer { inner, start, end, pad, max_len })
    }

    /// Token ids for one prompt: start, the prompt's tokens (truncated), end, then padding up to `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize the prompt: {e}")))?;
        let body = encoding.get_ids();
        let keep = body.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.start);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.end);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// Where the end token sits in `ids` (the pooled output is read there).
    pub fn eos_position(&self, ids: &[u32]) -> usize {
        ids.iter().position(|&t| t == self.end).unwrap_or(ids.len().saturating_sub(1))
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// The BPE vocabulary and merges of a `tokenizer.json` (`model.vocab`, and `model.merges` as pairs or
/// as `"a b"` strings, as older files have them).
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges), EngineError> {
    let invalid = |why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let model = &json["model"];
    if model["type"].as_str().is_some_and(|t| t != "BPE") {
        return Err(invalid(format!("the tokenizer model is {}, not BPE", model["type"])));
    }
    let vocab: HashMap<String, u32> =
        serde_json::from_value(model["vocab"].clone()).map_err(|e| invalid(format!("model.vocab: {e}")))?;
    let merges = model["merges"].as_array().ok_or_else(|| invalid("model.merges is not a list".into()))?;
    let merges = merges
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
            serde_json::Value::Array(pair) => match pair.as_slice() {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| invalid("model.merges holds something that is not a pair of tokens".into()))?;
    Ok((vocab.into_iter().collect(), merges))
}

fn existing(path: PathBuf) -> Result<PathBuf, EngineError> {
    if path.is_file() { Ok(path) } else { Err(EngineError::MissingFile(path)) }
}

/// `pad_token` from `tokenizer_config.json` or `special_tokens_map.json`: a string or `{"content": ..}`.
fn pad_token(dir: &Path) -> Result<Option<String>, EngineError> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::InvalidFile { path: path.clone(), why: e.to_string() })?;
        match json.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(v) => {
                if let Some(s) = v.get("content").and_then(|c| c.as_str()) {
                    return Ok(Some(s.to_owned()));
                }
            }
            None => {}
        }
    }
    Ok(None)
}

/// GPT-2's byte-to-character table, which CLIP's vocabulary is written in: printable bytes stand for
/// themselves, the others for the characters from U+0100 on, in byte order.
pub fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_tokenizer_merges_words_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        crate::testing::write_tokenizer(dir.path(), Some("!")).unwrap();
        let t = ClipTokenizer::load(dir.path(), 16).unwrap();
        let ids = t.encode("A  cute   Otter").unwrap();
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], t.start);
        // "a", "cute", "otter" are whole words in the tiny vocabulary.
        let word = |w: &str| t.inner.token_to_id(w).unwrap();
        assert_eq!(&ids[1..4], &[word("a</w>"), word("cute</w>"), word("otter</w>")]);
        assert_eq!(ids[4], t.end);
        assert_eq!(t.eos_position(&ids), 4);
        assert!(ids[5..].iter().all(|&i| i == word("!")));
        // Long prompts are cut to the context, still ending with the end token.
        let long = t.encode(&"otter ".repeat(40)).unwrap();
        assert_eq!(long.len(), 16);
        assert_eq!(long[15], t.end);
    }

    /// The ids transformers 5.23's `CLIPTokenizer` gives for these prompts on the same tiny vocabulary
    /// (`write_tokenizer`, pad token `!`, `padding="max_length", max_length=16`): special tokens typed
    /// in a prompt, the pad token `!` among them, are split out first and keep their own ids.
    #[test]
    fn special_tokens_in_the_text_are_what_transformers_makes_of_them() {
        let dir = tempfile::tempdir().unwrap();
        crate::testing::write_tokenizer(dir.path(), Some("!")).unwrap();
        let t = ClipTokenizer::load(dir.path(), 16).unwrap();
        let pad = |ids: &[u32]| -> Vec<u32> { ids.iter().copied().chain(std::iter::repeat(33)).take(16).collect() };
        for (prompt, expected) in [
            ("A  cute   Otter!", pad(&[532, 353, 514, 523, 33, 533])),
            ("a cute otter!!", pad(&[532, 353, 514, 523, 33, 33, 533])),
            ("hello ! world", pad(&[532, 104, 101, 108, 108, 367, 33, 119, 111, 114, 108, 356, 533])),
            ("!a", pad(&[532, 33, 353, 533])),
            ("cute!otter", pad(&[532, 514, 33, 523, 533])),
            ("a <|endoftext|> cat", pad(&[532, 353, 533, 527, 533])),
            ("<|startoftext|>cat", pad(&[532, 532, 527, 533])),
            ("a!?b", pad(&[532, 353, 33, 319, 354, 533])),
            ("  !  ", pad(&[532, 33, 533])),
        ] {
            assert_eq!(t.encode(prompt).unwrap(), expected, "{prompt:?}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = ClipTokenizer::load(dir.path(), 77).err().unwrap();
        assert!(e.to_string().contains("vocab.json"), "{e}");
    }
}
