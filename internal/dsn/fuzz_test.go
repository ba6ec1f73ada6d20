package dsn

import (
	"errors"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/pgswo/swo/internal/dsn/dsntest"
)

// The fuzz targets of this file (go test -fuzz=FuzzParseRedact ./internal/dsn, and
// FuzzScrub) run as unit tests over their seeds with plain go test.
//
// SWO_FUZZ_KNOWN_BUGS selects what to do with the password leaks already
// reported (dsn reads a different password from a connection string than pgx
// does: see knownLeakSeeds):
//
//	unset   the seeds below only (they pass); -fuzz finds the known leaks again
//	"seeds" also run the reproducers of the known leaks (they fail until fixed)
//	"skip"  tolerate leaks of the known class, to fuzz past them for new ones

var knownBugs = os.Getenv("SWO_FUZZ_KNOWN_BUGS")

// connSeed is a connection string to build, holding pw in one of the ways
// of dsntest.Embed.
type connSeed struct {
	form                       uint8
	user, pw, host, db, params string
}

// tricky passwords: URL and keyword/value delimiters, escapes, quotes,
// dots, unicode, spaces, and look-alikes of the mask.
var trickyPasswords = []string{
	"pa:ss/w@rd%", "p@ss@word", "100%pure", "%41%42%43", "que?ry#frag", "semi;colon&amp=",
	`it's "quoted"`, `back\slash\`, "with space  and\ttab", "pässwörd-ünïcødé-密码", "dot.ted.pass",
	"'''", `\'\'`, "xxxxx-mask", "::::", "@@@@", "////", "pass=word", "+plus+", "%zz%",
	"password=inner", "$dollar&amp;", "[ipv6]:1", "e\u0301-combining", "\u202eright-to-left",
}

// connSeeds are every tricky password in every form, and odd parts.
var connSeeds = func() []connSeed {
	var out []connSeed
	for i, pw := range trickyPasswords {
		for form := uint8(0); form < 16; form++ {
			params := []string{"", "sslmode=disable", "application_name=svc", "sslmode=bogus", "port=x"}[(i+int(form))%5]
			out = append(out, connSeed{form, "alice", pw, "db.example:5432", "app", params})
		}
	}
	out = append(out,
		connSeed{0, "", "s3cr3t-P@ss", "", "", ""},
		connSeed{0, "al:ice", "s3cr3t-P@ss", "h", "d.b", ""},
		connSeed{0, "alice", "s3cr3t-P@ss", "[::1]:5432", "app", "password=other-S3cret"},
		connSeed{3, "alice", "s3cr3t-P@ss", "h1:5432,h2:5433", "app", "target_session_attrs=read-write"},
		connSeed{4, "alice", "s3cr3t-P@ss", "h", "app", "password"},
		connSeed{4, "o'brien", "s3cr3t-P@ss", "h h", "my db", "sslmode=bogus"},
		connSeed{5, "alice", "s3cr3t-P@ss", "h", "", "port=abc"},
		connSeed{1, "alice", "s3cr3t-P@ss", "h:notaport", "app", ""},
		connSeed{0, "alice", "s3cr3t-P@ss", "h:99999", "app", ""},
		connSeed{2, "alice", "s3cr3t-P@ss", "h", "app", "pool_max_conns=x"},
		connSeed{6, "alice", "s3cr3t-P@ss", "h", "app", "pool_max_conns=x"},
	)
	return out
}()

// seedsFor returns the seeds to run: without SWO_FUZZ_KNOWN_BUGS those
// outside the known class of leaks (which pass until it is fixed), with
// SWO_FUZZ_KNOWN_BUGS=seeds all of them and the reproducers.
func seedsFor() []connSeed {
	if knownBugs == "seeds" {
		return append(connSeeds[:len(connSeeds):len(connSeeds)], knownLeakSeeds...)
	}
	var out []connSeed
	for _, s := range connSeeds {
		if raw, _, _ := dsntest.Embed(s.form, s.user, s.pw, s.host, s.db, s.params); !dsntest.Misread(raw, s.pw) {
			out = append(out, s)
		}
	}
	return out
}

// knownLeakSeeds reproduce the leaks found by fuzzing (reported, not fixed
// here; partial leaks, such as password=secret\ pw showing " pw", are not
// caught by the property, which looks for the whole password). Each is a connection string whose password pgx reads as pw (unless
// noted), and which dsn shows with the password in the clear: Redact (so
// the flag usage text), and the error of Parse when the string is otherwise
// invalid.
var knownLeakSeeds = []connSeed{
	{4, "alice", "sec;ret-pw", "h", "app", "sslmode=bogus"},     // ?password=sec;ret-pw: net/url drops a query pair holding ';'
	{4, "alice", "100%pure", "h", "app", "sslmode=disable"},     // ?password=100%pure: net/url drops a pair with a bad escape (pgx refuses it)
	{4, "alice", "#fragment-pw", "h", "app", "sslmode=bogus"},   // ?password=#...: the rest is a fragment to net/url
	{2, "alice", "#Secr3t!", "h", "app", "sslmode=bogus"},       // user information starting with '#'
	{2, "alice", "?Secr3t!", "h", "app", "sslmode=bogus"},       // ... with '?'
	{2, "alice", "/Secr3t!", "h", "app", "sslmode=bogus"},       // ... with '/' (pgx: no password, database "/Secr3t!@h/app")
	{2, "alice", "12?secret", "h", "app", "sslmode=bogus"},      // a "port" before '?'
	{2, "alice", "#Secr3t!", "h", "app", ""},                    // valid: Parse succeeds, Redact (flag usage) shows it
	{2, "alice", "@@@@-pw", "h", "app", ""},                     // unencoded '@': pgx reads host "@@@-pw@h", Describe shows it
	{6, "alice", " secret-pw", "h", "app", "port=abc"},          // password=\ secret-pw (an escaped leading space)
	{8 | 4, "alice", "sec;ret-pw", "h", "app", "sslmode=bogus"}, // postgresql:// alike
}

// boilerplate is text that messages hold whatever the password: a password
// that is part of it cannot be told apart from a leak.
const boilerplate = Mask + "x " + `"invalid database URL: empty, not a valid URL (not shown: it may hold a password; ` +
	`percent-encode special characters such as @ : / in the user name and password), no database name, ` +
	`cannot parse failed to parse as URL failed to parse as keyword/value, invalid port, sslmode is invalid, ` +
	`unterminated quoted string in connection info string, invalid keyword/value, missing "=" after, ` +
	`could not match port numbers to hosts, unknown target_session_attrs value, invalid connect_timeout, ` +
	`missing key/value separator "=" in URI query parameter, extra key/value separator "=" in URI query parameter, ` +
	`forbidden NUL byte in connection string, strconv.ParseInt: parsing: invalid syntax, value out of range, ` +
	`cannot parse pool_max_conns, (unparseable URL, not shown), IPv6 host address may not be empty in URI, ` +
	`unexpected character at position in URI (expected ":" or "/"), invalid percent-encoded token, ` +
	`end of string reached when looking for matching "]" in IPv6 host address in URI, --db-url postgres://postgresql://`

// FuzzParseRedact: Parse, Redact, Describe and Scrub never panic; Parse's
// errors name the setting and wrap ErrInvalid; neither Redact's output, nor
// Parse's error, nor the description of what Parse read holds the password
// in any of its forms.
func FuzzParseRedact(f *testing.F) {
	for _, s := range seedsFor() {
		f.Add(s.form, s.user, s.pw, s.host, s.db, s.params)
	}
	f.Fuzz(func(t *testing.T, form uint8, user, pw, host, db, params string) {
		raw, written, at := dsntest.Embed(form, user, pw, host, db, params)
		red := Redact(raw)
		cfg, err := Parse("--db-url", raw)
		_ = Scrub(raw, pw, written)
		_ = ScrubURL(raw, raw)
		outs := map[string]string{"Redact": red}
		if err != nil {
			if !errors.Is(err, ErrInvalid) || !strings.HasPrefix(err.Error(), "--db-url: ") {
				t.Errorf("%q: error must name the setting and wrap ErrInvalid: %v", raw, err)
			}
			outs["Parse error"] = err.Error()
		} else {
			if cfg == nil {
				t.Fatalf("%q: Parse returned neither a configuration nor an error", raw)
			}
			outs["Describe"] = Describe(cfg)
		}
		forms := dsntest.Forms(pw, written)
		if (form&7 == 7 && strings.ContainsAny(pw, " \t\n\r\v\f")) || (form&7 == 4 && strings.Contains(pw, "&")) {
			return // unencoded, a space or & ends the value: the rest is other settings
		}
		if !dsntest.Checkable(raw, written, at, forms, boilerplate) {
			return
		}
		for what, out := range outs {
			if form, ok := dsntest.Leaked(out, forms); ok {
				if knownBugs == "skip" && dsntest.Misread(raw, pw) {
					continue // the known class: reported
				}
				t.Errorf("%s of %q holds the password %q (as %q):\n%s", what, raw, pw, form, out)
			}
		}
	})
}

// FuzzScrub: Scrub never panics, and takes every form it promises (the
// secret, query- and path-escaped, Go-quoted) out of the message.
func FuzzScrub(f *testing.F) {
	for _, pw := range trickyPasswords {
		f.Add("connect to postgres://alice:"+dsntest.EscapeUserinfo(pw)+"@h/app failed: "+pw+" "+strconv.Quote(pw), pw)
		f.Add(url.QueryEscape(pw)+url.PathEscape(pw)+pw+pw, pw)
	}
	f.Add("aaaaaa", "aaa")
	f.Add("", "")
	f.Add("password", "")
	f.Fuzz(func(t *testing.T, msg, secret string) {
		out := Scrub(msg, secret, secret+secret, "")
		if secret == "" {
			if out != msg {
				t.Errorf("Scrub with an empty secret changed %q to %q", msg, out)
			}
			return
		}
		if knownBugs == "skip" && strings.ContainsRune(secret, 'x') {
			return // the mask itself can complete the secret: reported
		}
		q := strconv.Quote(secret)
		for _, form := range []string{secret, url.QueryEscape(secret), url.PathEscape(secret), q} {
			if strings.Contains(out, form) {
				t.Errorf("Scrub(%q, %q) = %q still holds %q", msg, secret, out, form)
			}
		}
	})
}
