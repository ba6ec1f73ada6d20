// Package dsn parses and validates PostgreSQL connection strings (URLs and
// keyword/value strings) and renders them without their password.
//
// Invariant: nothing this package returns (errors, descriptions, redacted
// strings) contains the password of the connection string it was given.
// Errors from lower layers are scrubbed of the password before they are
// wrapped, and an unparseable URL is never echoed, because the parser cannot
// tell where its password ends.
package dsn

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Mask replaces passwords in rendered strings.
const Mask = "xxxxx"

// ErrInvalid is wrapped by every validation error of Parse.
var ErrInvalid = errors.New("invalid database URL")

// Parse validates a connection string and returns its pgx configuration. label
// names the setting in errors (for example "--db-url"). The error never holds
// the password.
func Parse(label, raw string) (*pgx.ConnConfig, error) {
	if strings.TrimSpace(raw) == "" {
		return nil, fmt.Errorf("%s: %w: empty", label, ErrInvalid)
	}
	shown := Redact(raw)
	if isURL(raw) {
		if _, err := url.Parse(raw); err != nil {
			// net/url errors quote the whole input, password included.
			return nil, fmt.Errorf("%s: %w: not a valid URL (not shown: it may hold a password; "+
				"percent-encode special characters such as @ : / in the user name and password)", label, ErrInvalid)
		}
		if ambiguous(raw) {
			return nil, fmt.Errorf("%s: %w: not shown: its user name or password holds an unencoded character "+
				"that ends it for some readers and not for others (percent-encode @ : / ? # in them)", label, ErrInvalid)
		}
	}
	// pgxpool's parser: pool_* parameters (used by OpenPool) are its, not
	// runtime parameters to send to the server.
	pc, err := pgxpool.ParseConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w %s: %s", label, ErrInvalid, shown, Scrub(cause(err), secretsOf(raw)...))
	}
	cfg := pc.ConnConfig
	if !isURL(raw) {
		// Where password= is written, pgx must read that password: an
		// empty value before it ("dbname= password=...") makes it the
		// value of the setting before, and a repeated one is ambiguous.
		for _, m := range kvPassword.FindAllStringSubmatch(raw, -1) {
			if v := m[2]; v != cfg.Password && unescapeKV(v) != cfg.Password {
				return nil, fmt.Errorf("%s: %w: not shown: its password= is not read as the password "+
					"(an empty value before it, or given twice)", label, ErrInvalid)
			}
		}
	}
	if cfg.Database == "" {
		return nil, fmt.Errorf("%s: %w %s: no database name", label, ErrInvalid, shown)
	}
	return cfg, nil
}

// cause is the innermost useful message of a pgconn parse error (its outer
// text repeats the connection string).
func cause(err error) string {
	if u := errors.Unwrap(err); u != nil {
		return u.Error()
	}
	return err.Error()
}

func isURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// The secrets of a connection string are found where pgx (and libpq) find
// them, not where net/url would: the user information of a URL runs to its
// first @ before any /, the query starts at the first ? after it, and a
// query value is a secret when its decoded key is password or sslpassword;
// a keyword/value string is tokenised as pgconn does it (quotes,
// backslash escapes, every space character pgconn trims). Redact masks
// those spans of the text as written, and Scrub takes them out of messages
// as written and decoded.

// userinfo returns the user information of a URL as libpq delimits it, and
// where it starts.
func userinfo(raw string) (string, int, bool) {
	start := strings.Index(raw, "://") + 3
	p := raw[start:]
	if i := strings.IndexAny(p, "@/"); i >= 0 && p[i] == '@' {
		return p[:i], start, true
	}
	return "", start, false
}

// ambiguous reports a URL that pgx (reading it as libpq does) and a
// reader following RFC 3986 (net/url) split differently, so that what one
// takes for the password the other may show as the host or the database:
// their user information differs (an unencoded @, #, ? or / in it), or an
// @ is left in the hosts, the database name or a query key.
func ambiguous(raw string) bool {
	rest := raw[strings.Index(raw, "://")+3:]
	libpq, hasLibpq := "", false
	if i := strings.IndexAny(rest, "@/"); i >= 0 && rest[i] == '@' {
		libpq, hasLibpq = rest[:i], true
	}
	authority := rest
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority = rest[:i]
	}
	rfc, hasRFC := "", false
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		rfc, hasRFC = authority[:i], true
	}
	if hasLibpq != hasRFC || libpq != rfc {
		return true
	}
	if hasLibpq {
		rest = rest[len(libpq)+1:]
	}
	// What follows holds no @ but in query values: an @ in the hosts, the
	// database name or a query key is the rest of a password.
	hosts, query, _ := strings.Cut(rest, "?")
	if strings.Contains(hosts, "@") {
		return true
	}
	for _, pair := range strings.Split(query, "&") {
		if key, _, _ := strings.Cut(pair, "="); strings.Contains(key, "@") {
			return true
		}
	}
	return false
}

// secretSpans returns the spans of raw that hold a password: where pgx
// reads one, and, in keyword/value form, wherever password= is written.
func secretSpans(raw string) [][2]int {
	if isURL(raw) {
		return urlSecretSpans(raw)
	}
	spans := kvSecretSpans(raw)
	for _, m := range kvPassword.FindAllStringSubmatchIndex(raw, -1) {
		spans = append(spans, [2]int{m[4], m[5]})
	}
	return mergeSpans(spans)
}

// kvPassword finds password= wherever it is written (the value quoted, or
// unquoted with backslash escapes).
var kvPassword = regexp.MustCompile(`(password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:[^\s\\]|\\.)+)`)

func urlSecretSpans(raw string) [][2]int {
	var spans [][2]int
	ui, off, ok := userinfo(raw)
	if ok {
		if j := strings.IndexByte(ui, ':'); j >= 0 {
			spans = append(spans, [2]int{off + j + 1, off + len(ui)})
		}
		off += len(ui) + 1
	}
	// The query starts at the first ? after the hosts (a bracketed IPv6
	// address may hold one).
	q := -1
	for i, inBrackets := off, false; i < len(raw) && q < 0; i++ {
		switch raw[i] {
		case '[':
			inBrackets = true
		case ']':
			inBrackets = false
		case '?':
			if !inBrackets {
				q = i
			}
		}
	}
	// Wherever password= is written, whatever pgx makes of it.
	for _, m := range urlPassword.FindAllStringSubmatchIndex(raw[off:], -1) {
		spans = append(spans, [2]int{off + m[2], off + m[3]})
	}
	if q < 0 {
		return mergeSpans(spans)
	}
	pos := q + 1
	for _, pair := range strings.Split(raw[q+1:], "&") {
		key, _, found := strings.Cut(pair, "=")
		if dk, err := url.PathUnescape(key); err == nil {
			key = dk
		}
		if found && (key == "password" || key == "sslpassword") {
			spans = append(spans, [2]int{pos + strings.IndexByte(pair, '=') + 1, pos + len(pair)})
		}
		pos += len(pair) + 1
	}
	return mergeSpans(spans)
}

var urlPassword = regexp.MustCompile(`password=([^&]*)`)

// mergeSpans sorts spans and merges those that overlap.
func mergeSpans(spans [][2]int) [][2]int {
	slices.SortFunc(spans, func(a, b [2]int) int { return a[0] - b[0] })
	var out [][2]int
	for _, sp := range spans {
		if n := len(out); n > 0 && sp[0] <= out[n-1][1] {
			out[n-1][1] = max(out[n-1][1], sp[1])
			continue
		}
		out = append(out, sp)
	}
	return out
}

const kvSpace = " \t\n\r\v\f"

func kvSecretSpans(raw string) [][2]int {
	var spans [][2]int
	i := 0
	skip := func() {
		for i < len(raw) && strings.IndexByte(kvSpace, raw[i]) >= 0 {
			i++
		}
	}
	for skip(); i < len(raw); skip() {
		eq := strings.IndexByte(raw[i:], '=')
		if eq < 0 {
			break
		}
		key := strings.Fields(raw[i : i+eq]) // the last word: pgconn refuses a key with a space, so mask anyway
		i += eq + 1
		skip()
		start := i
		if i < len(raw) && raw[i] == '\'' {
			for i++; i < len(raw) && raw[i] != '\''; i++ {
				if raw[i] == '\\' {
					i++
				}
			}
			i = min(i+1, len(raw)) // past the closing quote; unterminated: to the end
		} else {
			for ; i < len(raw) && strings.IndexByte(kvSpace, raw[i]) < 0; i++ {
				if raw[i] == '\\' {
					i++
				}
			}
			i = min(i, len(raw))
		}
		if len(key) > 0 && (key[len(key)-1] == "password" || key[len(key)-1] == "sslpassword") {
			spans = append(spans, [2]int{start, i})
		}
	}
	return spans
}

// secretsOf returns the passwords of a connection string, as written and
// decoded.
func secretsOf(raw string) []string {
	var out []string
	for _, sp := range secretSpans(raw) {
		s := raw[sp[0]:sp[1]]
		out = append(out, s)
		if isURL(raw) {
			if d, err := url.PathUnescape(s); err == nil {
				out = append(out, d)
			}
			continue
		}
		out = append(out, strings.Trim(s, "'"), unescapeKV(s))
	}
	if cfg, err := pgconn.ParseConfig(raw); err == nil && cfg.Password != "" {
		out = append(out, cfg.Password)
	}
	return out
}

// unescapeKV is the value of a keyword/value setting as written: quotes
// taken off, backslash escapes resolved.
func unescapeKV(s string) string {
	if len(s) >= 2 && s[0] == '\'' && s[len(s)-1] == '\'' {
		s = s[1 : len(s)-1]
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Redact renders a connection string with its passwords masked. A URL that
// does not parse is not rendered at all.
func Redact(raw string) string {
	if isURL(raw) {
		if _, err := url.Parse(raw); err != nil {
			return "(unparseable URL, not shown)"
		}
		if ambiguous(raw) {
			return "(ambiguous URL, not shown)"
		}
	}
	spans := secretSpans(raw)
	for i := len(spans) - 1; i >= 0; i-- {
		raw = raw[:spans[i][0]] + Mask + raw[spans[i][1]:]
	}
	return raw
}

// Scrub replaces every occurrence of the secrets (and their common encodings)
// in msg with Mask.
func Scrub(msg string, secrets ...string) string {
	var forms []string
	for _, s := range secrets {
		if len(s) >= 1 {
			forms = append(forms, s, url.QueryEscape(s), url.PathEscape(s), strconv.Quote(s))
		}
	}
	for _, form := range forms {
		msg = strings.ReplaceAll(msg, form, Mask)
	}
	for _, form := range forms {
		if strings.Contains(msg, form) {
			// The mask completed a secret (one made of x's and what was
			// around it): withhold the message.
			return "(message not shown: it may hold a password)"
		}
	}
	return msg
}

// ScrubURL replaces the password of raw, wherever it appears in msg.
func ScrubURL(msg, raw string) string { return Scrub(msg, secretsOf(raw)...) }

// Describe renders where a configuration connects, without the password:
// user@host:port/database.
func Describe(cfg *pgx.ConnConfig) string {
	return fmt.Sprintf("%s@%s:%d/%s", cfg.User, cfg.Host, cfg.Port, cfg.Database)
}
