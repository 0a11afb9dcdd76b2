//! The largest plan an estimate is made for: the bounds the estimates endpoint and `imagegate estimate`
//! put on their inputs, kept here beside the math they keep in range.
//!
//! Each is generous for real use. Within them no token count comes near `u64` and no amount near
//! `Decimal`'s 28 digits: the largest item (a million requests of ten images with the longest prompt,
//! sixteen input images and three partial images) counts about 2.4e11 input and 1.7e14 output tokens.
//! The math is checked all the same, for callers that pass more (a `PriceError`, never a wrapped number).

/// Requests in one planned item: twenty full files of OpenAI's Batch API (50,000 lines each), more
/// than a month of heavy production.
pub const MAX_REQUESTS: u64 = 1_000_000;

/// Images per request: OpenAI's `n` goes from 1 to 10.
pub const MAX_IMAGES_PER_REQUEST: u64 = 10;

/// Text tokens of one prompt: four times the longest prompt any model takes (32,000 characters),
/// because an o200k token covers at least one UTF-8 byte and a character is at most four bytes. No
/// accepted prompt can count more; a typical one counts a sixteenth of it (about four characters a
/// token).
pub const MAX_PROMPT_TOKENS: u64 = 128_000;

/// Words of one prompt: the words that count as `MAX_PROMPT_TOKENS` tokens at 4 tokens per 3 words
/// ([`crate::tokens_for_words`]).
pub const MAX_PROMPT_WORDS: u64 = MAX_PROMPT_TOKENS / 4 * 3;

/// Input images of one edit, as edits take them.
pub const MAX_INPUT_IMAGES: usize = 16;

/// Pixels on a side of an output or input image: the largest side a JPEG can have. Output sizes are
/// further limited to the ones a model prices, and input images are scaled to fit 2048 px before their
/// tokens are counted, so this only has to be larger than any real image.
pub const MAX_IMAGE_SIDE: u32 = 65_535;

/// Partial images streamed per image: OpenAI's `partial_images` goes from 0 to 3.
pub const MAX_PARTIAL_IMAGES: u64 = 3;
