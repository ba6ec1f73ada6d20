package swo

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/pgswo/swo/internal/dsn/dsntest"
	"github.com/pgswo/swo/internal/schema"
)

// FuzzConfigValidate runs as a unit test over its seeds with plain go test,
// and fuzzes with go test -fuzz=FuzzConfigValidate -run '^$' . (without a
// database). SWO_FUZZ_KNOWN_BUGS, as in internal/dsn's fuzz_test.go:
// "seeds" adds the reproducers of the reported password leaks (they fail
// until fixed), "skip" tolerates leaks of their class (dsn reads another
// password than pgx does) to fuzz past them.
var fuzzKnownBugs = os.Getenv("SWO_FUZZ_KNOWN_BUGS")

// configPasswords are passwords with URL and keyword/value delimiters,
// escapes, quotes, dots and unicode in them.
var configPasswords = []string{
	"s3cr3t-P@ss", "pa:ss/w@rd%", "p@ss@word", "que?ry#frag", "semi;colon&amp=", `it's "quoted"`,
	`back\slash\`, "with space\tand tab", "pässwörd-密码", "dot.ted.pass", "'''", "%41%42%43",
	"pass=word", "+plus+", "[ipv6]:1", "password=inner",
}

// configSeed is a configuration to build: form picks how the old (low four
// bits) and next (high four; 15: none) URLs hold their passwords (see
// dsntest.Embed).
type configSeed struct {
	form                               uint8
	user, pw, host, db, params, nextPw string
	namespace, exclude                 string
}

var configSeeds = func() []configSeed {
	var out []configSeed
	namespaces := []string{"", "swo", "Bad-Name", "a_1", "1abc", "ünï", "x" + strings.Repeat("y", 31), "public.x", `"q"`}
	excludes := []string{"", "public.orders", "*.*\netl.*", `"a.b".c`, `a."b.c"`, `"*"`, "orders\n\n\"un", ".\n..\n*"}
	for i, pw := range configPasswords {
		for form := 0; form < 16; form++ {
			next := uint8(15)
			if form%3 != 0 {
				next = uint8((form + i) % 16)
			}
			params := []string{"", "sslmode=disable", "sslmode=bogus", "port=x", "application_name=svc"}[(i+form)%5]
			out = append(out, configSeed{uint8(form) | next<<4, "alice", pw, "db.example:5432", "app", params,
				"next-" + pw, namespaces[(i+form)%len(namespaces)], excludes[(i*3+form)%len(excludes)]})
		}
	}
	out = append(out,
		configSeed{0xF0, "", "s3cr3t-P@ss", "", "", "", "", "", ""},
		configSeed{0x00, "alice", "s3cr3t-P@ss", "h", "app", "", "s3cr3t-P@ss", "swo", ""},
		configSeed{0x35, "o'brien", "s3cr3t-P@ss", "h h", "my db", "port=abc", "other-S3cret", "swo", ""},
		configSeed{0xF1, "alice", "s3cr3t-P@ss", "h:notaport", "app", "", "", "swo", ""},
		configSeed{0x20, "alice", "s3cr3t-P@ss", "h", "app", "pool_max_conns=x", "n3xt-S3cret", "swo", ""},
	)
	return out
}()

// knownConfigLeaks reproduce the password leaks of Validate (reported):
// libpq-valid URLs that dsn reads differently from pgx, echoed in the error
// of an otherwise invalid configuration.
var knownConfigLeaks = []configSeed{
	{0xF4, "alice", "sec;ret-pw", "h", "app", "sslmode=bogus", "", "", ""},
	{0xF2, "alice", "#Secr3t!", "h", "app", "sslmode=bogus", "", "", ""},
	{0x40, "alice", "s3cr3t-P@ss", "h", "app", "", "100%N3xt-pw", "", ""}, // NextURL ?password=100%N3xt-pw
}

// configBoilerplate is text that Validate's errors hold whatever the
// passwords are: a password that is part of it is not checked.
const configBoilerplate = `swo: invalid configuration: Config.Namespace: use 1 to 31 lower-case letters, digits or _, ` +
	`not starting with a digit, Config.OldURL (--db-url) Config.NextURL (--db-url-next) invalid database URL: empty, ` +
	`not a valid URL (not shown: it may hold a password; percent-encode special characters such as @ : / in the user ` +
	`name and password), no database name, cannot parse failed to parse as URL failed to parse as keyword/value, ` +
	`invalid port, sslmode is invalid, unterminated quoted string in connection info string, invalid keyword/value, ` +
	`missing "=" after, could not match port numbers to hosts, unknown target_session_attrs value, ` +
	`missing key/value separator "=" in URI query parameter, extra key/value separator "=" in URI query parameter, ` +
	`forbidden NUL byte in connection string, strconv.ParseInt: parsing: invalid syntax, value out of range, ` +
	`cannot parse pool_max_conns, IPv6 host address may not be empty in URI, invalid percent-encoded token in password, ` +
	`unexpected character at position in URI (expected ":" or "/"), xxxxxx postgres://postgresql://`

// FuzzConfigValidate: Validate never panics, is deterministic, and fails
// only with errors that wrap ErrConfig, say "swo: " once, and hold neither
// URL's password in any form; the exclusion patterns never make it (or the
// settings nodes compare) panic or depend on their order; and a valid
// configuration's redactor takes its passwords out of any error.
func FuzzConfigValidate(f *testing.F) {
	seeds := configSeeds
	if fuzzKnownBugs == "seeds" {
		seeds = append(seeds[:len(seeds):len(seeds)], knownConfigLeaks...)
	} else {
		seeds = slices.DeleteFunc(slices.Clone(seeds), func(s configSeed) bool { return s.misread() })
	}
	for _, s := range seeds {
		f.Add(s.form, s.user, s.pw, s.host, s.db, s.params, s.nextPw, s.namespace, s.exclude)
	}
	f.Fuzz(func(t *testing.T, form uint8, user, pw, host, db, params, nextPw, namespace, exclude string) {
		s := configSeed{form, user, pw, host, db, params, nextPw, namespace, exclude}
		oldURL, oldWritten, oldAt := dsntest.Embed(form&15, user, pw, host, db, params)
		var nextURL, nextWritten string
		var nextAt int
		if form>>4 != 15 {
			nextURL, nextWritten, nextAt = dsntest.Embed(form>>4, user, nextPw, host, db, params)
		}
		cfg := Config{OldURL: oldURL, NextURL: nextURL, Namespace: namespace, NodeName: "fuzz", Version: "v0"}
		if exclude != "" {
			cfg.ExcludeTables = strings.Split(exclude, "\n")
		}
		err := cfg.Validate()
		if err2 := cfg.Validate(); errString(err) != errString(err2) {
			t.Fatalf("Validate is not deterministic: %v, then %v", err, err2)
		}
		agreed := cfg.agreed()
		rev := cfg
		rev.ExcludeTables = slices.Clone(cfg.ExcludeTables)
		slices.Reverse(rev.ExcludeTables)
		if rev.agreed() != agreed {
			t.Errorf("the agreed settings depend on the order of ExcludeTables: %s, %s", agreed, rev.agreed())
		}
		_ = schema.Excluded(cfg.ExcludeTables, "public", "orders")

		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Errorf("Validate: %v does not wrap ErrConfig", err)
			}
			if msg := err.Error(); !strings.HasPrefix(msg, "swo: ") || strings.HasPrefix(msg, "swo: swo: ") {
				t.Errorf("Validate: %q does not start with one \"swo: \"", msg)
			}
		} else {
			checkRedactor(t, cfg)
		}

		msg := errString(err)
		type secret struct {
			pw, raw, written, other string
			at                      int
		}
		secrets := []secret{{pw, oldURL, oldWritten, nextURL, oldAt}}
		if nextURL != "" {
			secrets = append(secrets, secret{nextPw, nextURL, nextWritten, oldURL, nextAt})
		}
		for i, sc := range secrets {
			if f := []uint8{form & 15, form >> 4}[i]; (f&7 == 7 && strings.ContainsAny(sc.pw, " \t\n\r\v\f")) || (f&7 == 4 && strings.Contains(sc.pw, "&")) {
				continue // unencoded, a space or & ends the value: the rest is other settings
			}
			forms := dsntest.Forms(sc.pw, sc.written)
			if !dsntest.Checkable(sc.raw, sc.written, sc.at, forms, configBoilerplate, sc.other, strconv.Quote(namespace), exclude) {
				continue
			}
			if form, ok := dsntest.Leaked(msg, forms); ok {
				if fuzzKnownBugs == "skip" && dsntest.Misread(sc.raw, sc.pw) {
					continue // the known class: reported
				}
				t.Errorf("Validate of %+v: the error holds the password %q (as %q):\n%s", s, sc.pw, form, msg)
			}
		}
	})
}

func (s configSeed) misread() bool {
	raw, _, _ := dsntest.Embed(s.form&15, s.user, s.pw, s.host, s.db, s.params)
	if dsntest.Misread(raw, s.pw) {
		return true
	}
	if s.form>>4 == 15 {
		return false
	}
	raw, _, _ = dsntest.Embed(s.form>>4, s.user, s.nextPw, s.host, s.db, s.params)
	return dsntest.Misread(raw, s.nextPw)
}

// checkRedactor: a valid configuration's redactor takes the passwords it
// read out of errors, in every form Scrub promises, keeping the chain.
func checkRedactor(t *testing.T, cfg Config) {
	t.Helper()
	p, err := cfg.withDefaults().parse()
	if err != nil {
		t.Fatalf("Validate accepted what parse refuses: %v", err)
	}
	if p.public(nil) != nil || p.scrub(nil) != nil {
		t.Error("the redactor made an error of nil")
	}
	for _, pw := range p.passwords {
		if len(pw) < 4 || strings.Contains("swo: connect: invalid configuration", pw) {
			continue // too short to tell from the message's own text
		}
		if fuzzKnownBugs == "skip" && strings.ContainsRune(pw, 'x') {
			continue // a password with an x can be completed by the mask: reported
		}
		forms := []string{pw, url.QueryEscape(pw), url.PathEscape(pw), strconv.Quote(pw)}
		cause := fmt.Errorf("connect: %s %s %s %q: %w", pw, url.QueryEscape(pw), url.PathEscape(pw), pw, ErrConfig)
		for what, e := range map[string]error{"public": p.public(cause), "scrub": p.scrub(cause)} {
			if !errors.Is(e, ErrConfig) {
				t.Errorf("%s lost the chain: %v", what, e)
			}
			if form, ok := dsntest.Leaked(e.Error(), forms); ok {
				t.Errorf("%s(%q) holds the password %q (as %q): %s", what, cause, pw, form, e)
			}
		}
		if msg := p.public(cause).Error(); !strings.HasPrefix(msg, "swo: ") || strings.HasPrefix(msg, "swo: swo: ") {
			t.Errorf("public: %q does not start with one \"swo: \"", msg)
		}
	}
}

// TestFlagUsageHidesPasswords: URLs with passwords from the environment
// (LoadEnv) are the flags' defaults, and the usage text (-h,
// PrintDefaults) shows them without their passwords, while the flags keep
// the real URLs.
func TestFlagUsageHidesPasswords(t *testing.T) {
	for _, tc := range []struct {
		name, old, next string
		secrets         []string
	}{
		{"URLs", "postgres://app:Old-S3cret@db1.example:5432/app?sslmode=disable",
			"postgresql://app:New-S3cret@db2.example/app", []string{"Old-S3cret", "New-S3cret"}},
		{"percent-encoded", "postgres://app:p%40ss%3Aw%2Frd%25@db1.example/app", "postgres://app:%C3%BCber%20geheim@db2.example/app",
			[]string{"p@ss:w/rd%", "p%40ss%3Aw%2Frd%25", "über geheim", "%C3%BCber%20geheim", "%C3%BCber"}},
		{"query parameter", "postgres://app@db1.example/app?password=Old-S3cret&sslmode=disable",
			"postgres://app@db2.example/app?sslmode=disable&password=New%2BS3cret", []string{"Old-S3cret", "New+S3cret", "New%2BS3cret"}},
		{"keyword/value", "host=db1.example user=app password='Old S3cret' dbname=app",
			"host=db2.example user=app password=New-S3cret dbname=app", []string{"Old S3cret", "New-S3cret"}},
		{"unparseable", "postgres://app:Old:S3cret@db1.example:notaport/app", "postgres://app:New-S3cret@db2.example:99999/app",
			[]string{"Old:S3cret", "S3cret", "New-S3cret"}},
		// Valid to libpq and pgx, read otherwise by net/url (the dsn leak
		// reported with the fuzz targets).
		{"unencoded #", "postgres://app:#Old-S3cret@db1.example/app", "", []string{"#Old-S3cret", "Old-S3cret"}},
		{"unencoded ; in the query", "postgres://app@db1.example/app?password=Old;S3cret", "", []string{"Old;S3cret"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("MYAPP_DB_URL", tc.old)
			t.Setenv("MYAPP_DB_URL_NEXT", tc.next)
			var cfg Config
			cfg.LoadEnv("MYAPP")
			fs := flag.NewFlagSet("service", flag.ContinueOnError)
			var out bytes.Buffer
			fs.SetOutput(&out)
			cfg.RegisterFlags(fs)
			fs.PrintDefaults()
			if err := fs.Parse([]string{"-h"}); !errors.Is(err, flag.ErrHelp) {
				t.Fatalf("-h: %v", err)
			}
			fs.VisitAll(func(fl *flag.Flag) { fmt.Fprintf(&out, "\n%s default %s", fl.Name, fl.DefValue) })
			usage := out.String()
			for _, s := range tc.secrets {
				if strings.Contains(usage, s) {
					t.Errorf("the usage text holds the password %q:\n%s", s, usage)
				}
			}
			if !strings.Contains(usage, "db-url") || !strings.Contains(usage, "db-url-next") {
				t.Errorf("the usage text does not list the flags:\n%s", usage)
			}
			if cfg.OldURL != tc.old || cfg.NextURL != tc.next {
				t.Errorf("the flags changed the URLs from the environment: %q, %q", cfg.OldURL, cfg.NextURL)
			}
			fs2 := flag.NewFlagSet("service", flag.ContinueOnError)
			fs2.SetOutput(&out)
			cfg.RegisterFlags(fs2)
			if err := fs2.Parse([]string{"--db-url=postgres://u:flag-S3cret@h/a"}); err != nil {
				t.Fatal(err)
			}
			if cfg.OldURL != "postgres://u:flag-S3cret@h/a" || cfg.NextURL != tc.next {
				t.Errorf("after --db-url: %q, %q", cfg.OldURL, cfg.NextURL)
			}
		})
	}
}
