package dsn

import (
	"errors"
	"strings"
	"testing"
)

func TestRedactAndParseNeverShowThePassword(t *testing.T) {
	const pw = "pa:ss/w@rd%"
	cases := []string{
		"postgres://alice:pa%3Ass%2Fw%40rd%25@db.example:5432/app?sslmode=disable",
		"postgres://alice:pa%3Ass%2Fw%40rd%25@db.example:5432/app?sslmode=bogus",
		"postgresql://alice@db.example/app?password=pa%3Ass%2Fw%40rd%25&sslmode=nope",
		"postgres://alice:pa:ss/w@rd%@db.example/app", // not escaped: unparseable
		"host=db.example user=alice password='pa:ss/w@rd%' dbname=app sslmode=bogus",
		"host=db.example user=alice password=pa:ss/w@rd% port=x dbname=app",
	}
	for _, raw := range cases {
		red := Redact(raw)
		_, err := Parse("--db-url", raw)
		for _, s := range []string{red, errString(err)} {
			for _, form := range []string{pw, "pa%3Ass", "pa:ss", "w@rd"} {
				if strings.Contains(s, form) {
					t.Errorf("%q leaks %q: %s", raw, form, s)
				}
			}
		}
		if err != nil && (!errors.Is(err, ErrInvalid) || !strings.HasPrefix(err.Error(), "--db-url: ")) {
			t.Errorf("%q: error must name the setting and wrap ErrInvalid: %v", raw, err)
		}
	}
}

func TestParseAcceptsGoodURLs(t *testing.T) {
	for _, raw := range []string{
		"postgres://alice:secret@db.example:5433/app?sslmode=disable",
		"postgresql://alice@db.example/app",
		"host=db.example user=alice dbname=app",
	} {
		cfg, err := Parse("--db-url", raw)
		if err != nil {
			t.Fatalf("%q: %v", raw, err)
		}
		if d := Describe(cfg); !strings.HasPrefix(d, "alice@db.example:") || !strings.HasSuffix(d, "/app") {
			t.Fatalf("Describe = %q", d)
		}
	}
	if got := Redact("postgres://alice:secret@h/app"); got != "postgres://alice:xxxxx@h/app" {
		t.Fatalf("Redact = %q", got)
	}
}

func TestParseRefusesMissingParts(t *testing.T) {
	for _, raw := range []string{"", "  ", "postgres://alice:secret@h"} {
		if _, err := Parse("--db-url-next", raw); !errors.Is(err, ErrInvalid) {
			t.Fatalf("%q: err = %v", raw, err)
		}
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
