// Package dsntest builds connection strings that hold a password in every
// form PostgreSQL clients accept, for the tests (fuzz targets among them)
// that check no password is ever shown: those of internal/dsn and those of
// package swo's configuration.
package dsntest

import (
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// Embed renders a connection string holding pw: in the user information of
// a URL (form 0: escaped as net/url does, 1: every byte percent-encoded,
// 2: as is), as its password query parameter (3: escaped, 4: as is), or in
// keyword/value form (5: quoted, 6: unquoted with escapes, 7: as is). Bit 3
// of form picks the scheme postgresql:// over postgres://. It returns the
// string, the password's text as written in it, and where it was written
// (raw[at:at+len(written)]).
func Embed(form uint8, user, pw, host, db, params string) (raw, written string, at int) {
	scheme := "postgres://"
	if form&8 != 0 {
		scheme = "postgresql://"
	}
	switch form & 7 {
	case 0, 1, 2:
		written = []string{EscapeUserinfo(pw), percentAll(pw), pw}[form&7]
		prefix := scheme + user + ":"
		raw = prefix + written + "@" + host + "/" + db
		if params != "" {
			raw += "?" + params
		}
		return raw, written, len(prefix)
	case 3, 4:
		written = []string{url.QueryEscape(pw), pw}[form&7-3]
		prefix := scheme + user + "@" + host + "/" + db + "?password="
		raw = prefix + written
		if params != "" {
			raw += "&" + params
		}
		return raw, written, len(prefix)
	}
	prefix := "host=" + host + " user=" + user + " dbname=" + db + " password="
	switch form & 7 {
	case 5:
		prefix += "'"
		written = backslashEscape(pw, "'\\")
		raw = prefix + written + "'"
	case 6:
		written = backslashEscape(pw, "'\\ \t\n\r\v\f")
		raw = prefix + written
	default:
		written = pw
		raw = prefix + written
	}
	if params != "" {
		raw += " " + params
	}
	return raw, written, len(prefix)
}

// Forms are the texts that give a password away: as is, as written, and
// in the encodings a URL may carry it in.
func Forms(pw, written string) []string {
	forms := []string{pw, written, url.QueryEscape(pw), url.PathEscape(pw), EscapeUserinfo(pw), percentAll(pw)}
	if q := strconv.Quote(pw); len(q) > 2 {
		forms = append(forms, q[1:len(q)-1])
	}
	return forms
}

// EscapeUserinfo escapes s as net/url does in a URL's user information.
func EscapeUserinfo(s string) string {
	return strings.TrimPrefix(url.UserPassword("", s).String(), ":")
}

func percentAll(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		fmt.Fprintf(&b, "%%%02X", s[i])
	}
	return b.String()
}

func backslashEscape(s, special string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(special, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Checkable reports whether a leak of a password (forms, as Forms gives
// them, the password first) in a message could be told from a
// coincidence: the password is long enough, and none of its forms is in
// the rest of raw (around it, or around a mask of five or six x in its
// place) or in others (the messages' own text, other settings).
func Checkable(raw, written string, at int, forms []string, others ...string) bool {
	pw := forms[0]
	if len(pw) < 4 || pw[0] == 'x' || pw[len(pw)-1] == 'x' {
		return false // short, or a mask next to part of it could complete it
	}
	before, after := raw[:at], raw[at+len(written):]
	ctx := append([]string{before + after, before + "xxxxx" + after, before + "xxxxxx" + after}, others...)
	for _, form := range forms {
		for _, c := range ctx {
			if strings.Contains(c, form) {
				return false
			}
		}
	}
	return true
}

// Leaked returns the first of forms found in out.
func Leaked(out string, forms []string) (string, bool) {
	for _, form := range forms {
		if strings.Contains(out, form) {
			return form, true
		}
	}
	return "", false
}

// kvPassword is how internal/dsn reads a keyword/value password.
var kvPassword = regexp.MustCompile(`(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// Misread reports the class of every password leak found so far: the
// reading of raw's password that internal/dsn makes (net/url's for a URL,
// a regular expression's for keyword/value) or pgx's differs from pw, the
// password as written. The connection strings are valid to libpq and pgx
// (or a user's common mistake, such as an unencoded @), but dsn masks
// another part of them than the password.
func Misread(raw, pw string) bool {
	var read string
	if strings.HasPrefix(raw, "postgres://") || strings.HasPrefix(raw, "postgresql://") {
		if u, err := url.Parse(raw); err == nil {
			if p, ok := u.User.Password(); ok {
				read = p
			} else {
				read = u.Query().Get("password")
			}
		} else {
			read = pw // unparseable: not shown
		}
	} else if m := kvPassword.FindStringSubmatch(raw); m != nil {
		read = strings.Trim(m[2], "'")
	}
	if read != pw {
		return true
	}
	cfg, err := pgconn.ParseConfig(raw)
	return err == nil && cfg.Password != pw
}
