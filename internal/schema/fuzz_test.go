package schema

import (
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// knownBugs is SWO_FUZZ_KNOWN_BUGS (see internal/dsn's fuzz_test.go):
// "seeds" adds the reproducers of the reported bugs to the seeds (they fail
// until fixed), "skip" tolerates them so that fuzzing goes past them.
var knownBugs = os.Getenv("SWO_FUZZ_KNOWN_BUGS")

// patternNames are table and schema names that need quoting, or look like
// the pattern syntax.
var patternNames = []string{
	"orders", "Orders", "a.b", `say "hi"`, `"`, `""`, ".", "..", "", " ", "a b", "ünïcødé", "表",
	"x$y", "_", "1abc", "select", `a"."b`, `"a"`, "a*", "**", "'", `\`, "tab\there", "dot.",
}

// knownPatternBugs are names that do not round-trip (reported, not fixed
// here): a quoted "*" is the wildcard, not the table or schema named *.
// Each is a schema and table, and another table the quoted name matches.
var knownPatternBugs = [][4]string{
	{"public", "*", "public", "orders"},
	{"*", "orders", "public", "orders"},
	{"*", "*", "app", "t"},
}

// FuzzExclusionPatterns: SplitPattern and Excluded never panic; a pattern
// made by quoting a table's schema and name (as Name does, or always
// quoting, as pgx.Identifier does) splits back into them and matches that
// table and no other; and every pattern means what its normalised
// rendering means.
func FuzzExclusionPatterns(f *testing.F) {
	for i, s := range patternNames {
		n := patternNames[(i*7+3)%len(patternNames)]
		f.Add(s, n, Name(s, n), "public", "orders")
		f.Add(n, s, s, s, n)
	}
	for _, p := range []string{"*", "*.*", "public.*", "*.orders", `"a.b".c`, `a."b.c"`, `"unterminated`, `a.b.c`,
		`""."".""`, `"a""b"`, `.`, `..`, `"*"`, `"*".*`, `*."*"`, `"a"b.c"d"`, "a\x00b", "\xff\xfe"} {
		f.Add("public", "orders", p, "a", "b.c")
	}
	if knownBugs == "seeds" {
		for _, b := range knownPatternBugs {
			f.Add(b[0], b[1], "*", b[2], b[3])
		}
	}
	f.Fuzz(func(t *testing.T, schemaName, table, pattern, otherSchema, otherTable string) {
		// Any pattern: no panic, and, where neither part is * (SplitPattern
		// does not tell a wildcard from a quoted *: see knownPatternBugs),
		// it means what its rendering, every part quoted, means.
		ps, pn := SplitPattern(pattern)
		norm := render(ps, pn)
		_ = Excluded([]string{pattern, norm, ""}, otherSchema, otherTable)
		if ps != "*" && pn != "*" {
			if s2, n2 := SplitPattern(norm); s2 != ps || n2 != pn {
				t.Errorf("SplitPattern(%q) = %q, %q; its rendering %q splits into %q, %q", pattern, ps, pn, norm, s2, n2)
			}
			for _, tbl := range [][2]string{{schemaName, table}, {otherSchema, otherTable}, {ps, pn}} {
				if Excluded([]string{pattern}, tbl[0], tbl[1]) != Excluded([]string{norm}, tbl[0], tbl[1]) {
					t.Errorf("pattern %q and its rendering %q disagree on %q.%q", pattern, norm, tbl[0], tbl[1])
				}
			}
		}

		// A quoted name: exactly that table. PostgreSQL names hold no NUL
		// (pgx.Identifier drops it).
		if strings.ContainsRune(schemaName+table, 0) {
			return
		}
		if knownBugs == "skip" && (schemaName == "*" || table == "*") {
			return // a quoted "*" is the wildcard: reported
		}
		for _, quoted := range []string{Name(schemaName, table), pgx.Identifier{schemaName, table}.Sanitize()} {
			if s, n := SplitPattern(quoted); s != schemaName || n != table {
				t.Errorf("SplitPattern(%s) = %q, %q; want %q, %q", quoted, s, n, schemaName, table)
			}
			if !Excluded([]string{quoted}, schemaName, table) {
				t.Errorf("pattern %s does not exclude %q.%q", quoted, schemaName, table)
			}
			if (otherSchema != schemaName || otherTable != table) && Excluded([]string{quoted}, otherSchema, otherTable) {
				t.Errorf("pattern %s excludes %q.%q too", quoted, otherSchema, otherTable)
			}
		}
		// A bare quoted name: that table in any schema, and only it.
		bare := pgx.Identifier{table}.Sanitize()
		if !Excluded([]string{bare}, otherSchema, table) {
			t.Errorf("pattern %s does not exclude %q.%q", bare, otherSchema, table)
		}
		if otherTable != table && Excluded([]string{bare}, otherSchema, otherTable) {
			t.Errorf("pattern %s excludes %q.%q too", bare, otherSchema, otherTable)
		}
	})
}

// render writes a split pattern back, every part quoted.
func render(schemaName, table string) string {
	quote := func(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
	return quote(schemaName) + "." + quote(table)
}
