package pgtest

import (
	"context"
	"crypto/sha256"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The independent checker.
//
// Compare tells whether two databases hold the same user data. It is written
// apart from the library on purpose: it shares none of swo's code, reads the
// catalogs itself, runs as the administrative role (a superuser) with
// row_security off, so that nothing is hidden from it, and compares in a
// different way from swo's own verification (every row's text, hashed and
// matched as a multiset in Go, rather than digests summed in the database).
// A blind spot of the library is then not also a blind spot of its tests.
//
// What it compares:
//   - the rows of every ordinary table of every user schema (partitions,
//     inheritance children and unlogged tables included), columns matched by
//     name, generated columns included;
//   - the state of every sequence: the value nextval hands out next (from
//     last_value, is_called and the increment: an is_called false sequence
//     at n and an is_called true one at n - increment are the same state);
//   - large objects: owner, privileges and content;
//   - materialized views: whether they are populated;
//   - table relationships: inheritance parents, partition parents and
//     bounds; row level security (enabled, forced) and policies;
//   - which tables and sequences exist, user tables in system schemas
//     included;
//   - with CompareOptions.MatViewRows, the rows of materialized views.

// CompareOptions narrow a comparison.
type CompareOptions struct {
	// SkipSchemas are not compared at all (the library's own schema).
	SkipSchemas []string
	// SkipTables ("schema.table") are not compared: tables excluded from a
	// switchover, or written after it. Their existence is still compared.
	SkipTables []string
	// SkipSequences ("schema.sequence") are not compared.
	SkipSequences []string
	// MatViewRows compares the rows of materialized views too (their
	// content is computed again in a new database, not copied: equal only
	// when nothing was written since they were refreshed).
	MatViewRows bool
}

// sessionSettings make every value's text form the same whatever the
// server's or the role's defaults.
var sessionSettings = map[string]string{
	"DateStyle":          "ISO, MDY",
	"IntervalStyle":      "postgres",
	"extra_float_digits": "3",
	"TimeZone":           "UTC",
	"bytea_output":       "hex",
	"lc_monetary":        "C",
	"row_security":       "off",
}

// connectChecker opens a checker session as the administrative role.
func connectChecker(ctx context.Context, url string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	for k, v := range sessionSettings {
		cfg.RuntimeParams[k] = v
	}
	cfg.RuntimeParams["application_name"] = "pgtest-checker"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	var super bool
	if err := conn.QueryRow(ctx, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&super); err != nil || !super {
		conn.Close(context.Background())
		return nil, fmt.Errorf("pgtest: the checker needs a superuser (got superuser=%v, %v)", super, err)
	}
	return conn, nil
}

// dbContent is what the checker reads of one database.
type dbContent struct {
	tables    map[string][]string // qualified name -> column names, sorted
	mvCols    map[string][]string // materialized view -> column names, sorted
	relations map[string]string   // qualified name -> "inherits a, b" / "partition of p FOR VALUES ..."
	security  map[string]string   // qualified name -> row level security and policies
	sequences map[string]string   // qualified name -> "last_value/is_called"
	matviews  map[string]bool     // qualified name -> populated
	largeObjs map[uint32]string   // oid -> owner, acl, md5 of content
}

func readContent(ctx context.Context, conn *pgx.Conn, skipSchemas []string) (*dbContent, error) {
	c := &dbContent{tables: map[string][]string{}, mvCols: map[string][]string{}, relations: map[string]string{}, security: map[string]string{},
		sequences: map[string]string{}, matviews: map[string]bool{}, largeObjs: map[uint32]string{}}
	userSchema := `(n.nspname NOT IN ('pg_catalog', 'information_schema') OR c.oid >= 16384) AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)' AND NOT n.nspname = ANY($1)`
	rows, err := conn.Query(ctx, `
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind::text, c.relispopulated,
	'rls ' || c.relrowsecurity::text || ' forced ' || c.relforcerowsecurity::text || ' policies ' ||
	coalesce((SELECT string_agg(p.polname || ' ' || p.polcmd::text || ' ' || p.polpermissive::text || ' ' || p.polroles::regrole[]::text || ' ' ||
		coalesce(pg_get_expr(p.polqual, p.polrelid), '') || ' ' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), ''), '; ' ORDER BY p.polname)
		FROM pg_policy p WHERE p.polrelid = c.oid), ''),
	coalesce((SELECT string_agg(quote_ident(a.attname), ',' ORDER BY a.attname) FROM pg_attribute a
		WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), ''),
	coalesce((SELECT string_agg(quote_ident(pn.nspname) || '.' || quote_ident(p.relname), ',' ORDER BY i.inhseqno)
		FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
		WHERE i.inhrelid = c.oid), ''),
	coalesce(pg_get_expr(c.relpartbound, c.oid), '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S', 'm') AND c.relpersistence <> 't' AND `+userSchema, skipSchemas)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var name, kind, security, cols, parents, bound string
		var populated bool
		if err := rows.Scan(&name, &kind, &populated, &security, &cols, &parents, &bound); err != nil {
			return nil, err
		}
		switch kind {
		case "r", "p":
			if kind == "r" {
				c.tables[name] = strings.Split(cols, ",")
			}
			if parents != "" {
				c.relations[name] = "inherits " + parents + " " + bound
			}
			c.security[name] = security
		case "S":
			c.sequences[name] = ""
		case "m":
			c.matviews[name] = populated
			c.mvCols[name] = strings.Split(cols, ",")
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for name := range c.sequences {
		var next string
		err := conn.QueryRow(ctx, `SELECT CASE WHEN is_called THEN last_value::numeric + (SELECT seqincrement FROM pg_sequence WHERE seqrelid = $1::regclass) ELSE last_value END::text FROM `+name, name).Scan(&next)
		if err != nil {
			return nil, fmt.Errorf("sequence %s: %w", name, err)
		}
		c.sequences[name] = "next value " + next
	}
	rows, err = conn.Query(ctx, `SELECT oid, pg_get_userbyid(lomowner) || ' ' || coalesce(lomacl::text, '') || ' ' || md5(lo_get(oid))
FROM pg_largeobject_metadata`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var oid uint32
		var v string
		if err := rows.Scan(&oid, &v); err != nil {
			return nil, err
		}
		c.largeObjs[oid] = v
	}
	return c, rows.Err()
}

// tableRows returns the sha256 of each row's text (columns in the given
// order), sorted, and a sample row text by hash for reports.
func tableRows(ctx context.Context, conn *pgx.Conn, table string, cols []string) ([]string, map[string]string, error) {
	rows, err := conn.Query(ctx, fmt.Sprintf("SELECT ROW(%s)::text FROM ONLY %s", strings.Join(cols, ", "), table))
	if err != nil {
		return nil, nil, err
	}
	defer rows.Close()
	var hashes []string
	sample := map[string]string{}
	for rows.Next() {
		var text string
		if err := rows.Scan(&text); err != nil {
			return nil, nil, err
		}
		sum := sha256.Sum256([]byte(text))
		h := fmt.Sprintf("%x", sum[:12])
		hashes = append(hashes, h)
		if len(text) > 200 {
			text = text[:200] + "…"
		}
		sample[h] = text
	}
	sort.Strings(hashes)
	return hashes, sample, rows.Err()
}

// Compare returns every difference in user data between the databases at
// the two URLs, which must be a superuser's (see the comment above). An
// empty list means they hold the same data.
func Compare(ctx context.Context, oldURL, newURL string, opts CompareOptions) ([]string, error) {
	oc, err := connectChecker(ctx, oldURL)
	if err != nil {
		return nil, err
	}
	defer oc.Close(context.Background())
	nc, err := connectChecker(ctx, newURL)
	if err != nil {
		return nil, err
	}
	defer nc.Close(context.Background())
	skip := opts.SkipSchemas
	if skip == nil {
		skip = []string{}
	}
	o, err := readContent(ctx, oc, skip)
	if err != nil {
		return nil, fmt.Errorf("old database: %w", err)
	}
	n, err := readContent(ctx, nc, skip)
	if err != nil {
		return nil, fmt.Errorf("new database: %w", err)
	}
	var diffs []string
	add := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }
	skipped := func(list []string, name string) bool {
		for _, s := range list {
			if unquoted(name) == s || name == s {
				return true
			}
		}
		return false
	}
	for _, name := range sortedKeys(o.tables) {
		ocols := o.tables[name]
		ncols, ok := n.tables[name]
		switch {
		case !ok:
			add("table %s: missing in the new database", name)
			continue
		case !slices.Equal(ocols, ncols):
			add("table %s: columns (%s) in the old database, (%s) in the new one", name, strings.Join(ocols, ", "), strings.Join(ncols, ", "))
			continue
		case skipped(opts.SkipTables, name):
			continue
		}
		oh, osample, err := tableRows(ctx, oc, name, ocols)
		if err != nil {
			return nil, fmt.Errorf("old database: table %s: %w", name, err)
		}
		nh, nsample, err := tableRows(ctx, nc, name, ocols)
		if err != nil {
			return nil, fmt.Errorf("new database: table %s: %w", name, err)
		}
		if slices.Equal(oh, nh) {
			continue
		}
		onlyOld, onlyNew := multisetDiff(oh, nh)
		d := fmt.Sprintf("table %s: %d rows in the old database, %d in the new; %d rows only in the old, %d only in the new",
			name, len(oh), len(nh), len(onlyOld), len(onlyNew))
		for i, h := range onlyOld {
			if i == 3 {
				break
			}
			d += "\n      old only: " + osample[h]
		}
		for i, h := range onlyNew {
			if i == 3 {
				break
			}
			d += "\n      new only: " + nsample[h]
		}
		diffs = append(diffs, d)
	}
	for _, name := range sortedKeys(n.tables) {
		if _, ok := o.tables[name]; !ok {
			add("table %s: only in the new database", name)
		}
	}
	for _, name := range sortedKeys(o.sequences) {
		ov := o.sequences[name]
		nv, ok := n.sequences[name]
		switch {
		case !ok:
			add("sequence %s: missing in the new database", name)
		case skipped(opts.SkipSequences, name):
		case ov != nv:
			add("sequence %s: %s in the old database, %s in the new", name, ov, nv)
		}
	}
	for _, name := range sortedKeys(o.relations) {
		if o.relations[name] != n.relations[name] {
			add("relation of %s: %q in the old database, %q in the new", name, o.relations[name], n.relations[name])
		}
	}
	for _, name := range sortedKeys(n.relations) {
		if _, ok := o.relations[name]; !ok {
			add("relation of %s: only in the new database: %q", name, n.relations[name])
		}
	}
	for _, name := range sortedKeys(o.security) {
		if ns, ok := n.security[name]; ok && ns != o.security[name] {
			add("table %s: %s in the old database, %s in the new", name, o.security[name], ns)
		}
	}
	for _, name := range sortedKeys(o.matviews) {
		np, ok := n.matviews[name]
		if !ok || np != o.matviews[name] {
			add("materialized view %s: populated %v in the old database, %v (exists %v) in the new", name, o.matviews[name], np, ok)
			continue
		}
		if !opts.MatViewRows || !np {
			continue
		}
		oh, _, err := tableRows(ctx, oc, name, o.mvCols[name])
		if err != nil {
			return nil, fmt.Errorf("old database: materialized view %s: %w", name, err)
		}
		nh, _, err := tableRows(ctx, nc, name, o.mvCols[name])
		if err != nil {
			return nil, fmt.Errorf("new database: materialized view %s: %w", name, err)
		}
		if !slices.Equal(oh, nh) {
			add("materialized view %s: %d rows in the old database, %d in the new, not the same", name, len(oh), len(nh))
		}
	}
	for _, oid := range sortedKeys(o.largeObjs) {
		if nv, ok := n.largeObjs[oid]; !ok {
			add("large object %d: missing in the new database", oid)
		} else if nv != o.largeObjs[oid] {
			add("large object %d: %q in the old database, %q in the new", oid, o.largeObjs[oid], nv)
		}
	}
	for _, oid := range sortedKeys(n.largeObjs) {
		if _, ok := o.largeObjs[oid]; !ok {
			add("large object %d: only in the new database", oid)
		}
	}
	return diffs, nil
}

// AssertSame fails the test if the two databases hold different user data
// (see Compare). The library's schema "swo" is skipped unless opts names
// the schemas to skip.
func AssertSame(t testing.TB, old, next *Database, opts CompareOptions) {
	t.Helper()
	if opts.SkipSchemas == nil {
		opts.SkipSchemas = []string{"swo"}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	diffs, err := Compare(ctx, old.AdminURL(), next.AdminURL(), opts)
	if err != nil {
		t.Fatalf("pgtest: compare databases: %v", err)
	}
	if len(diffs) > 0 {
		t.Fatalf("the independent checker found %d difference(s) between %s and %s:\n  %s", len(diffs), old.Name, next.Name, strings.Join(diffs, "\n  "))
	}
}

// multisetDiff returns the elements of sorted a not matched in sorted b,
// and the other way round.
func multisetDiff(a, b []string) (onlyA, onlyB []string) {
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		switch {
		case a[i] == b[j]:
			i++
			j++
		case a[i] < b[j]:
			onlyA = append(onlyA, a[i])
			i++
		default:
			onlyB = append(onlyB, b[j])
			j++
		}
	}
	return append(onlyA, a[i:]...), append(onlyB, b[j:]...)
}

func unquoted(name string) string { return strings.ReplaceAll(name, `"`, "") }

func sortedKeys[K string | uint32, V any](m map[K]V) []K {
	keys := make([]K, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
