package swo

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/pgswo/swo/internal/dsn"
	"github.com/pgswo/swo/internal/msglog"
)

// sentinels lists every exported error callers branch on.
func sentinels() []error {
	return []error{ErrObsolete, ErrConfig, ErrClosed, ErrNotReady, ErrRunFailed, ErrResetFailed, ErrDone,
		ErrPreconditions, ErrTargetNotEmpty, ErrPauseBudget}
}

// storedCodes are the codes the message log stores for the sentinels that
// cross nodes. They are stored, so they may never change: this list is
// written out rather than taken from codes.
var storedCodes = map[string]error{
	"preconditions":    ErrPreconditions,
	"target_not_empty": ErrTargetNotEmpty,
	"pause_budget":     ErrPauseBudget,
	"obsolete":         ErrObsolete,
	"config":           ErrConfig,
	"not_ready":        ErrNotReady,
	"done":             ErrDone,
	"closed":           ErrClosed,
}

// throughLog stores f as the message log does (JSON in a message's data)
// and reads it back as a node's view does.
func throughLog(t *testing.T, f failure) failure {
	t.Helper()
	raw, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	var back failure
	if err := (msglog.Message{Kind: msglog.KindFailed, Data: raw}).Decode(&back); err != nil {
		t.Fatal(err)
	}
	return back
}

func TestCodesAreStable(t *testing.T) {
	t.Parallel()
	if len(codes) != len(storedCodes) {
		t.Errorf("codes has %d entries, the stored codes are %d", len(codes), len(storedCodes))
	}
	for _, c := range codes {
		if want, ok := storedCodes[c.code]; !ok || want != c.err {
			t.Errorf("code %q names %v, want %v (a stored code may not change)", c.code, c.err, want)
		}
	}
}

func TestFailureRoundTripKeepsSentinel(t *testing.T) {
	t.Parallel()
	for code, sentinel := range storedCodes {
		t.Run(code, func(t *testing.T) {
			t.Parallel()
			orig := fmt.Errorf("leader web-2: run 12: %w", fmt.Errorf("final sync: %w", sentinel))
			f := encodeFailure(orig)
			if f.Code != code || f.Error != orig.Error() || f.Problems != nil {
				t.Fatalf("encodeFailure = %+v, want code %q and the text %q", f, code, orig.Error())
			}
			for _, via := range []struct {
				name string
				f    failure
			}{{"direct", f}, {"through the log", throughLog(t, f)}} {
				got := via.f.err()
				if got == nil {
					t.Fatalf("%s: err() = nil", via.name)
				}
				if got.Error() != orig.Error() {
					t.Errorf("%s: text %q, want %q", via.name, got.Error(), orig.Error())
				}
				for _, s := range sentinels() {
					if errors.Is(got, s) != (s == sentinel) {
						t.Errorf("%s: errors.Is(%q) = %v, want %v", via.name, s, errors.Is(got, s), s == sentinel)
					}
				}
				var pe *PreconditionError
				if errors.As(got, &pe) {
					t.Errorf("%s: a *PreconditionError appeared without problems: %v", via.name, pe)
				}
				// Wrapped again on the receiving node, it still matches.
				wrapped := fmt.Errorf("%w: %w", ErrRunFailed, got)
				if !errors.Is(wrapped, sentinel) || !errors.Is(wrapped, ErrRunFailed) {
					t.Errorf("%s: wrapped on the receiving node, the identity is lost", via.name)
				}
			}
		})
	}
}

func TestFailureRoundTripPreconditions(t *testing.T) {
	t.Parallel()
	probs := []Problem{
		{Object: "public.orders", Issue: "no primary key"},
		{Object: "public.orders.total", Issue: "type integer in the old database, bigint in the new one"},
		{Object: "node web-2", Issue: "nodes disagree on the next database"},
	}
	cases := []struct {
		name string
		err  error
	}{
		{"bare", &PreconditionError{Problems: probs}},
		{"wrapped", fmt.Errorf("check: %w", &PreconditionError{Problems: probs})},
		{"wrapped with reset failed", fmt.Errorf("%w: %w", ErrResetFailed, fmt.Errorf("check: %w", &PreconditionError{Problems: probs}))},
		{"wrapped with another sentinel", fmt.Errorf("%w: %w", ErrConfig, &PreconditionError{Problems: probs})},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := encodeFailure(tc.err)
			if f.Code != "preconditions" {
				t.Errorf("code %q, want preconditions (the most specific)", f.Code)
			}
			if !reflect.DeepEqual(f.Problems, probs) {
				t.Errorf("problems %v, want %v", f.Problems, probs)
			}
			for _, via := range []struct {
				name string
				f    failure
			}{{"direct", f}, {"through the log", throughLog(t, f)}} {
				got := via.f.err()
				if got == nil || got.Error() != tc.err.Error() {
					t.Fatalf("%s: %v, want the text %q", via.name, got, tc.err.Error())
				}
				if !errors.Is(got, ErrPreconditions) {
					t.Errorf("%s: errors.Is(ErrPreconditions) = false", via.name)
				}
				var pe *PreconditionError
				if !errors.As(fmt.Errorf("execute: %w", got), &pe) {
					t.Fatalf("%s: errors.As(*PreconditionError) = false", via.name)
				}
				if !reflect.DeepEqual(pe.Problems, probs) {
					t.Errorf("%s: problems %v, want %v", via.name, pe.Problems, probs)
				}
			}
		})
	}
}

// The stored form: field names as the log holds them.
func TestFailureStoredForm(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		stored   string
		text     string
		sentinel error
		problems []Problem
		isNil    bool
	}{
		{"empty", `{}`, "", nil, nil, true},
		{"text only (the owner check)", `{"error":"node x stopped answering during syncing"}`, "node x stopped answering during syncing", nil, nil, false},
		{"pause budget", `{"error":"swo: pause budget exceeded","code":"pause_budget"}`, "swo: pause budget exceeded", ErrPauseBudget, nil, false},
		{"target not empty", `{"error":"t","code":"target_not_empty"}`, "t", ErrTargetNotEmpty, nil, false},
		{"problems", `{"error":"p","code":"preconditions","problems":[{"object":"public.t","issue":"no primary key"}]}`, "p", ErrPreconditions,
			[]Problem{{Object: "public.t", Issue: "no primary key"}}, false},
		{"unknown code from a newer version", `{"error":"something new went wrong","code":"from_the_future"}`, "something new went wrong", nil, nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var f failure
			if err := (msglog.Message{Data: json.RawMessage(tc.stored)}).Decode(&f); err != nil {
				t.Fatal(err)
			}
			got := f.err()
			if tc.isNil {
				if got != nil {
					t.Fatalf("err() = %v, want nil", got)
				}
				return
			}
			if got == nil || got.Error() != tc.text {
				t.Fatalf("err() = %v, want the text %q", got, tc.text)
			}
			for _, s := range sentinels() {
				if errors.Is(got, s) != (s == tc.sentinel) {
					t.Errorf("errors.Is(%q) = %v, want %v", s, errors.Is(got, s), s == tc.sentinel)
				}
			}
			var pe *PreconditionError
			if errors.As(got, &pe) != (tc.problems != nil) {
				t.Fatalf("errors.As(*PreconditionError) = %v, want %v", pe != nil, tc.problems != nil)
			}
			if pe != nil && !reflect.DeepEqual(pe.Problems, tc.problems) {
				t.Errorf("problems %v, want %v", pe.Problems, tc.problems)
			}
		})
	}

	// And the encoding: a plain error stores its text only.
	raw, err := json.Marshal(encodeFailure(errors.New("plain")))
	if err != nil {
		t.Fatal(err)
	}
	if string(raw) != `{"error":"plain"}` {
		t.Errorf("stored %s, want {\"error\":\"plain\"}", raw)
	}
	raw, err = json.Marshal(encodeFailure(fmt.Errorf("x: %w", &PreconditionError{Problems: []Problem{{Object: "o", Issue: "i"}}})))
	if err != nil {
		t.Fatal(err)
	}
	var generic map[string]any
	if err := json.Unmarshal(raw, &generic); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"error": "x: " + (&PreconditionError{Problems: []Problem{{Object: "o", Issue: "i"}}}).Error(),
		"code": "preconditions", "problems": []any{map[string]any{"object": "o", "issue": "i"}}}
	if !reflect.DeepEqual(generic, want) {
		t.Errorf("stored %s, want %v", raw, want)
	}
}

func TestPreconditionErrorText(t *testing.T) {
	t.Parallel()
	cases := [][]Problem{
		nil,
		{{Object: "public.orders", Issue: "no primary key"}},
		{{Object: "public.a", Issue: "table missing"}, {Object: "public.b.c", Issue: "column missing"}, {Object: "node web-2", Issue: "unreachable"}},
	}
	for _, probs := range cases {
		t.Run(fmt.Sprint(len(probs)), func(t *testing.T) {
			t.Parallel()
			msg := (&PreconditionError{Problems: probs}).Error()
			if !strings.HasPrefix(msg, ErrPreconditions.Error()) {
				t.Errorf("%q does not start with %q", msg, ErrPreconditions.Error())
			}
			if !strings.Contains(msg, fmt.Sprintf("%d problem(s)", len(probs))) {
				t.Errorf("%q does not give the count %d", msg, len(probs))
			}
			if len(probs) == 0 {
				return
			}
			lines := strings.Split(msg, "\n")
			if len(lines) != len(probs)+1 {
				t.Fatalf("%q has %d lines, want a heading and one per problem", msg, len(lines))
			}
			for i, p := range probs {
				if !strings.Contains(lines[i+1], p.Object+": "+p.Issue) {
					t.Errorf("line %d %q does not list %q: %q", i+1, lines[i+1], p.Object, p.Issue)
				}
			}
		})
	}
}

func TestRedactorPublic(t *testing.T) {
	t.Parallel()
	const pw, pw2 = "s3cretpw", "n3xt/p@ss wd"
	r := redactor{passwords: []string{pw, pw2}}
	inner := errors.New("dial tcp: refused")
	pre := &PreconditionError{Problems: []Problem{{Object: "public.t", Issue: "no primary key"}}}
	cases := []struct {
		name     string
		err      error
		text     string // the exact public text
		is       []error
		asPrecon bool
	}{
		{"plain", inner, "swo: dial tcp: refused", []error{inner}, false},
		{"wrapped sentinel", fmt.Errorf("connect: %w", ErrObsolete), "swo: connect: database is obsolete", []error{ErrObsolete}, false},
		{"already prefixed", fmt.Errorf("swo: %w: Config.Namespace", ErrConfig), "swo: invalid configuration: Config.Namespace", []error{ErrConfig}, false},
		{"prefixed text deeper in the chain", fmt.Errorf("%w: more", errors.New("swo: the swo driver does not open connection strings")),
			"swo: the swo driver does not open connection strings: more", nil, false},
		{"a server message holding swo:", fmt.Errorf("insert: %w", errors.New("ERROR: swo: database x is obsolete")),
			"swo: insert: ERROR: swo: database x is obsolete", nil, false},
		{"preconditions", fmt.Errorf("%w: %w", ErrResetFailed, pre), "swo: reset failed: " + pre.Error(), []error{ErrResetFailed, ErrPreconditions, pre}, true},
		{"password in the text", fmt.Errorf("connect to postgres://u:%s@h/db: password %s rejected: %w", pw, pw, ErrConfig),
			"swo: connect to postgres://u:" + dsn.Mask + "@h/db: password " + dsn.Mask + " rejected: invalid configuration", []error{ErrConfig}, false},
		{"second password, escaped forms", fmt.Errorf("next: postgres://u:%s@h/db (%s): %w", url.QueryEscape(pw2), pw2, inner),
			"swo: next: postgres://u:" + dsn.Mask + "@h/db (" + dsn.Mask + "): dial tcp: refused", []error{inner}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := r.public(tc.err)
			if got == nil {
				t.Fatal("public returned nil for an error")
			}
			msg := got.Error()
			if msg != tc.text {
				t.Errorf("text %q, want %q", msg, tc.text)
			}
			if !strings.HasPrefix(msg, "swo: ") || strings.HasPrefix(msg, "swo: swo: ") {
				t.Errorf("%q is not prefixed \"swo: \" exactly once", msg)
			}
			if strings.Contains(msg, pw) || strings.Contains(msg, pw2) || strings.Contains(msg, url.QueryEscape(pw2)) {
				t.Errorf("%q holds a password", msg)
			}
			if !errors.Is(got, tc.err) {
				t.Error("the original error is not in the chain")
			}
			for _, s := range tc.is {
				if !errors.Is(got, s) {
					t.Errorf("errors.Is(%v) = false", s)
				}
			}
			var pe *PreconditionError
			if errors.As(got, &pe) != tc.asPrecon {
				t.Errorf("errors.As(*PreconditionError) = %v, want %v", pe != nil, tc.asPrecon)
			}

			// Public again: unchanged, prefixed once.
			again := r.public(got)
			if again.Error() != msg {
				t.Errorf("public twice: %q, want %q", again.Error(), msg)
			}
			if again != got {
				t.Error("public twice made a new error")
			}
			// By a redactor that knows no password: same text (already clean).
			if other := (redactor{}).public(got); other.Error() != msg {
				t.Errorf("public by another redactor: %q, want %q", other.Error(), msg)
			}
		})
	}
	if r.public(nil) != nil {
		t.Error("public(nil) != nil")
	}
}

func TestRedactorScrub(t *testing.T) {
	t.Parallel()
	r := redactor{passwords: []string{"s3cretpw", ""}}
	clean := fmt.Errorf("connect: %w", ErrObsolete)
	if got := r.scrub(clean); got != clean {
		t.Errorf("scrub of a clean error made a new one: %v", got)
	}
	if r.scrub(nil) != nil {
		t.Error("scrub(nil) != nil")
	}
	dirty := fmt.Errorf("auth s3cretpw: %w", ErrConfig)
	got := r.scrub(dirty)
	if got.Error() != "auth "+dsn.Mask+": invalid configuration" {
		t.Errorf("scrub: %q", got.Error())
	}
	if !errors.Is(got, ErrConfig) || !errors.Is(got, dirty) {
		t.Error("scrub lost the chain")
	}
	// scrub adds no prefix; public adds it once afterwards.
	if pub := r.public(got); pub.Error() != "swo: auth "+dsn.Mask+": invalid configuration" {
		t.Errorf("public after scrub: %q", pub.Error())
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	const pw = "s3cretpw"
	good := "postgres://u:" + pw + "@h/db"
	noDefaultDB := os.Getenv("PGDATABASE") == "" // pgx would take the database name from the environment
	cases := []struct {
		name  string
		cfg   Config
		field string // "": valid
		skip  bool
	}{
		{"minimal", Config{OldURL: good}, "", false},
		{"with next", Config{OldURL: good, NextURL: "postgres://u:" + pw + "@h2/db2"}, "", false},
		{"keyword/value", Config{OldURL: "host=h user=u password=" + pw + " dbname=db"}, "", false},
		{"namespace of 31", Config{OldURL: good, Namespace: "a" + strings.Repeat("_9", 15)}, "", false},
		{"namespace starting with _", Config{OldURL: good, Namespace: "_x1"}, "", false},

		{"namespace upper case", Config{OldURL: good, Namespace: "Swo"}, "Config.Namespace", false},
		{"namespace starting with a digit", Config{OldURL: good, Namespace: "9lives"}, "Config.Namespace", false},
		{"namespace with a dash", Config{OldURL: good, Namespace: "my-app"}, "Config.Namespace", false},
		{"namespace with a quote", Config{OldURL: good, Namespace: `a"b`}, "Config.Namespace", false},
		{"namespace of 32", Config{OldURL: good, Namespace: "a" + strings.Repeat("b", 31)}, "Config.Namespace", false},
		{"namespace with a newline", Config{OldURL: good, Namespace: "swo\n"}, "Config.Namespace", false},
		{"namespace not ASCII", Config{OldURL: good, Namespace: "swö"}, "Config.Namespace", false},

		{"no old URL", Config{}, "Config.OldURL", false},
		{"blank old URL", Config{OldURL: "  "}, "Config.OldURL", false},
		{"old URL without database", Config{OldURL: "postgres://u:" + pw + "@h"}, "Config.OldURL", !noDefaultDB},
		{"old URL with a bad port", Config{OldURL: "postgres://u:" + pw + "@h:99999/db"}, "Config.OldURL", false},
		{"old URL with a bad escape in the password", Config{OldURL: "postgres://u:" + pw + "%zz@h/db"}, "Config.OldURL", false},
		{"old URL with a slash in the password", Config{OldURL: "postgres://u:" + pw + "/x@h/db"}, "Config.OldURL", false},
		{"old URL with a bad sslmode", Config{OldURL: good + "?sslmode=bogus"}, "Config.OldURL", false},
		{"old URL password in the query", Config{OldURL: "postgres://u@h/db?password=" + pw + "&sslmode=bogus"}, "Config.OldURL", false},
		{"old keyword/value with a bad port", Config{OldURL: "host=h password=" + pw + " port=notaport dbname=db"}, "Config.OldURL", false},
		{"old keyword/value quoted password", Config{OldURL: "host=h password='" + pw + " x' sslmode=bogus dbname=db"}, "Config.OldURL", false},
		{"bad next URL", Config{OldURL: good, NextURL: "postgres://u:" + pw + "@h:notaport/db"}, "Config.NextURL", false},
		{"next URL with a bad sslmode", Config{OldURL: good, NextURL: "postgres://v:" + pw + "@h/db?sslmode=bogus"}, "Config.NextURL", false},
		{"bad namespace and URL: namespace first", Config{OldURL: "postgres://u:" + pw + "@h:x/db", Namespace: "A"}, "Config.Namespace", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.skip {
				t.Skip("PGDATABASE is set: pgx supplies the database name")
			}
			err := tc.cfg.Validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Validate = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate = nil, want an error naming %s", tc.field)
			}
			msg := err.Error()
			if !errors.Is(err, ErrConfig) {
				t.Errorf("%q does not wrap ErrConfig", msg)
			}
			if !strings.Contains(msg, tc.field) {
				t.Errorf("%q does not name %s", msg, tc.field)
			}
			if strings.Contains(msg, "s3cret") {
				t.Errorf("%q holds the password", msg)
			}
			if !strings.HasPrefix(msg, "swo: ") || strings.HasPrefix(msg, "swo: swo: ") {
				t.Errorf("%q is not prefixed \"swo: \" once", msg)
			}
			for _, other := range []string{"Config.Namespace", "Config.OldURL", "Config.NextURL"} {
				if other != tc.field && strings.Contains(msg, other) {
					t.Errorf("%q names %s, but the fault is %s", msg, other, tc.field)
				}
			}
		})
	}
}
