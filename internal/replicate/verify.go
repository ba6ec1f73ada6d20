package replicate

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/pgswo/swo/internal/schema"
)

// TableCheck is the comparison of one table between the two databases.
type TableCheck struct {
	Table     string `json:"table"`
	OldRows   int64  `json:"old_rows"`
	NewRows   int64  `json:"new_rows"`
	OldDigest string `json:"old_digest"`
	NewDigest string `json:"new_digest"`
	Equal     bool   `json:"equal"`
}

// SequenceCheck is the comparison of one sequence's state.
type SequenceCheck struct {
	Sequence string `json:"sequence"`
	Old      string `json:"old"` // "next value 43"
	New      string `json:"new"`
	Equal    bool   `json:"equal"`
}

// Report is the result of a verification.
type Report struct {
	Tables    []TableCheck    `json:"tables"`
	Sequences []SequenceCheck `json:"sequences"`
	Equal     bool            `json:"equal"` // every table and sequence equal
}

// Differences lists the tables that differ.
func (r Report) Differences() []TableCheck {
	var out []TableCheck
	for _, t := range r.Tables {
		if !t.Equal {
			out = append(out, t)
		}
	}
	return out
}

func (r Report) String() string {
	var lines []string
	for _, d := range r.Differences() {
		lines = append(lines, fmt.Sprintf("%s: %d rows (digest %s) in the old database, %d rows (digest %s) in the new one",
			d.Table, d.OldRows, d.OldDigest, d.NewRows, d.NewDigest))
	}
	for _, s := range r.Sequences {
		if !s.Equal {
			lines = append(lines, fmt.Sprintf("sequence %s: %s in the old database, %s in the new one", s.Sequence, s.Old, s.New))
		}
	}
	if len(lines) == 0 {
		return fmt.Sprintf("%d tables and %d sequences identical", len(r.Tables), len(r.Sequences))
	}
	return fmt.Sprintf("%d of %d tables and %d sequences differ:\n  %s", len(lines), len(r.Tables), len(r.Sequences), strings.Join(lines, "\n  "))
}

// digestSQL computes, in the database, a table's row count and an
// order-independent 128-bit digest: the sums of the two halves of each row's
// md5. Columns are taken in name order, so column order does not matter, and
// the pinned session settings make every value's text the same on both sides.
func digestSQL(t *schema.Table, names []string) string {
	cols := make([]string, len(names))
	for i, n := range names {
		cols[i] = "t." + pgx.Identifier{n}.Sanitize()
	}
	return fmt.Sprintf(`SELECT count(*),
	coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0)::text || '/' ||
	coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)::text
FROM (SELECT md5(ROW(%s)::text) AS h FROM ONLY %s t) s`, strings.Join(cols, ", "), t.QName())
}

// Verify compares the given tables (source side; the target table has the
// same qualified name) between the two databases, computing counts and
// digests in the databases, workers tables at a time on each side.
func Verify(ctx context.Context, src, dst *pgx.ConnConfig, source, target *schema.Database, workers int) (Report, error) {
	if workers <= 0 {
		workers = 4
	}
	checks := make([]TableCheck, len(source.Tables))
	work := make(chan int)
	g, gctx := errgroup.WithContext(ctx)
	for w := 0; w < min(workers, len(source.Tables)); w++ {
		g.Go(func() error {
			sc, err := Connect(gctx, src)
			if err != nil {
				return err
			}
			defer sc.Close(context.Background())
			dc, err := Connect(gctx, dst)
			if err != nil {
				return err
			}
			defer dc.Close(context.Background())
			for i := range work {
				s := source.Tables[i]
				d := target.Table(s.String())
				if d == nil {
					return fmt.Errorf("verify: %s is missing in the new database", s)
				}
				var names []string
				for _, c := range s.Columns {
					names = append(names, c.Name)
				}
				sort.Strings(names)
				c := TableCheck{Table: s.String()}
				// Both sides at once: each is one query in its own database.
				var derr error
				done := make(chan struct{})
				go func() {
					defer close(done)
					derr = dc.QueryRow(gctx, digestSQL(d, names)).Scan(&c.NewRows, &c.NewDigest)
				}()
				serr := sc.QueryRow(gctx, digestSQL(s, names)).Scan(&c.OldRows, &c.OldDigest)
				<-done
				if serr != nil {
					return fmt.Errorf("verify %s in the old database: %w", s, serr)
				}
				if derr != nil {
					return fmt.Errorf("verify %s in the new database: %w", s, derr)
				}
				c.Equal = c.OldRows == c.NewRows && c.OldDigest == c.NewDigest
				checks[i] = c
			}
			return nil
		})
	}
	idx := make([]int, len(source.Tables))
	for i := range idx {
		idx[i] = i
	}
	g.Go(func() error { return feed(gctx, work, idx) })
	var seqs []SequenceCheck
	if len(source.Sequences) > 0 {
		g.Go(func() (err error) { seqs, err = verifySequences(gctx, src, dst, source.Sequences); return err })
	}
	if err := g.Wait(); err != nil {
		return Report{}, err
	}
	r := Report{Tables: checks, Sequences: seqs, Equal: true}
	for _, c := range checks {
		r.Equal = r.Equal && c.Equal
	}
	for _, s := range seqs {
		r.Equal = r.Equal && s.Equal
	}
	return r, nil
}

// verifySequences compares the state (last_value, is_called) of the
// sequences in the two databases.
func verifySequences(ctx context.Context, src, dst *pgx.ConnConfig, seqs []*schema.Sequence) ([]SequenceCheck, error) {
	read := func(cfg *pgx.ConnConfig) (map[string]string, error) {
		conn, err := Connect(ctx, cfg)
		if err != nil {
			return nil, err
		}
		defer conn.Close(context.Background())
		var v seqValues
		for _, sql := range sequencesSQL(seqs) {
			rows, err := conn.Query(ctx, sql)
			if err != nil {
				return nil, err
			}
			if err := v.collect(rows, seqs); err != nil {
				return nil, err
			}
		}
		// Compared by the value nextval hands out next: the switch leaves
		// an is_called false sequence of the old database as the value
		// before it, is_called true (see freezeSQL), which means the same.
		out := map[string]string{}
		for i, j := range v.index {
			out[seqs[j].String()] = "next value " + nextValue(v.values[i], v.called[i], seqs[j].Increment).String()
		}
		return out, nil
	}
	old, err := read(src)
	if err != nil {
		return nil, fmt.Errorf("verify sequences in the old database: %w", err)
	}
	cur, err := read(dst)
	if err != nil {
		return nil, fmt.Errorf("verify sequences in the new database: %w", err)
	}
	out := make([]SequenceCheck, len(seqs))
	for i, s := range seqs {
		out[i] = SequenceCheck{Sequence: s.String(), Old: old[s.String()], New: cur[s.String()]}
		out[i].Equal = out[i].Old == out[i].New && out[i].Old != ""
	}
	return out, nil
}

// NonEmpty lists which of the database's tables hold at least one row, in one query.
func NonEmpty(ctx context.Context, conn *pgx.Conn, tables []*schema.Table) (map[string]bool, error) {
	out := map[string]bool{}
	if len(tables) == 0 {
		return out, nil
	}
	parts := make([]string, len(tables))
	for i, t := range tables {
		parts[i] = fmt.Sprintf("SELECT %d, EXISTS (SELECT 1 FROM ONLY %s)", i, t.QName())
	}
	rows, err := conn.Query(ctx, strings.Join(parts, " UNION ALL "))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var i int
		var has bool
		if err := rows.Scan(&i, &has); err != nil {
			return nil, err
		}
		if has {
			out[tables[i].String()] = true
		}
	}
	return out, rows.Err()
}
