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
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
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
	}
	// pgxpool's parser: pool_* parameters (used by OpenPool) are its, not
	// runtime parameters to send to the server.
	pc, err := pgxpool.ParseConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w %s: %s", label, ErrInvalid, shown, Scrub(cause(err), passwordOf(raw)))
	}
	cfg := pc.ConnConfig
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

var (
	urlPassword = regexp.MustCompile(`^(postgres(?:ql)?://[^:@/]*:)(.*)@`)
	kvPassword  = regexp.MustCompile(`(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)
)

// passwordOf extracts the password from a connection string, best effort.
func passwordOf(raw string) string {
	if isURL(raw) {
		if u, err := url.Parse(raw); err == nil {
			if p, ok := u.User.Password(); ok {
				return p
			}
			return u.Query().Get("password")
		}
		if m := urlPassword.FindStringSubmatch(raw); m != nil {
			return m[2]
		}
		return ""
	}
	if m := kvPassword.FindStringSubmatch(raw); m != nil {
		return strings.Trim(m[2], "'")
	}
	return ""
}

// Redact renders a connection string with its password masked. A URL that
// does not parse is not rendered at all.
func Redact(raw string) string {
	if isURL(raw) {
		u, err := url.Parse(raw)
		if err != nil {
			return "(unparseable URL, not shown)"
		}
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), Mask)
		}
		if q := u.Query(); q.Has("password") {
			q.Set("password", Mask)
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return kvPassword.ReplaceAllString(raw, "${1}"+Mask)
}

// Scrub replaces every occurrence of the secrets (and their common encodings)
// in msg with Mask.
func Scrub(msg string, secrets ...string) string {
	for _, s := range secrets {
		if len(s) < 1 {
			continue
		}
		for _, form := range []string{s, url.QueryEscape(s), url.PathEscape(s), strconv.Quote(s)} {
			msg = strings.ReplaceAll(msg, form, Mask)
		}
	}
	return msg
}

// ScrubURL replaces the password of raw, wherever it appears in msg.
func ScrubURL(msg, raw string) string { return Scrub(msg, passwordOf(raw)) }

// Describe renders where a configuration connects, without the password:
// user@host:port/database.
func Describe(cfg *pgx.ConnConfig) string {
	return fmt.Sprintf("%s@%s:%d/%s", cfg.User, cfg.Host, cfg.Port, cfg.Database)
}
