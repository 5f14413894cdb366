//! Exit codes of every `kst` command (sysexits.h where one fits).

/// Done.
pub const OK: u8 = 0;
/// Nothing stored for the address.
pub const NOT_FOUND: u8 = 1;
/// A bad argument, e.g. an address that is not one.
pub const USAGE: u8 = 64;
/// Bad input data: `deliver` got mail that is not for kst (Postfix bounces it); `outbox send`
/// set files aside that are not spool files.
pub const DATAERR: u8 = 65;
/// The input file of `import` cannot be read.
pub const NOINPUT: u8 = 66;
/// The store (or the mailer, for `config check --probe`) cannot be used now.
pub const UNAVAILABLE: u8 = 69;
/// A bug: an error kst did not expect.
pub const SOFTWARE: u8 = 70;
/// The output file of `export` cannot be written.
pub const CANTCREAT: u8 = 73;
/// Try again later; `deliver` uses it so that Postfix keeps the message.
pub const TEMPFAIL: u8 = 75;
/// The configuration is wrong.
pub const CONFIG: u8 = 78;
