package replicate

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// batch is the set of distinct captured keys of one round, by table oid.
type batch struct {
	changes int   // change rows read (with duplicates)
	maxID   int64 // highest change id read
	keys    map[uint32][][]string
}

// readBatch reads up to limit change rows (all if limit <= 0), oldest first.
func (e *Engine) readBatch(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, limit int) (*batch, error) {
	sql := "SELECT id, tbl, k FROM " + e.capture().ChangesTable() + " ORDER BY id"
	args := []any{}
	if limit > 0 {
		sql += " LIMIT $1"
		args = append(args, limit)
	}
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("read captured changes: %w", err)
	}
	defer rows.Close()
	b := &batch{keys: map[uint32][][]string{}}
	seen := map[string]bool{}
	var (
		id  int64
		tbl uint32
		k   []string
	)
	for rows.Next() {
		if err := rows.Scan(&id, &tbl, &k); err != nil {
			return nil, err
		}
		b.changes++
		b.maxID = max(b.maxID, id)
		sig := fmt.Sprint(tbl) + "\x00" + strings.Join(k, "\x00")
		if seen[sig] {
			continue
		}
		seen[sig] = true
		b.keys[tbl] = append(b.keys[tbl], k)
	}
	return b, rows.Err()
}

// apply deletes the batch's keys in the target and inserts the rows the
// source holds for them now (in src's transaction), inside dst's transaction.
func (e *Engine) apply(ctx context.Context, src *pgconn.PgConn, dst pgx.Tx, b *batch) (rows int64, err error) {
	oids := make([]uint32, 0, len(b.keys))
	for oid := range b.keys {
		oids = append(oids, oid)
	}
	sort.Slice(oids, func(i, j int) bool { return oids[i] < oids[j] })
	for _, oid := range oids {
		t := e.Source.TableByOID(oid)
		if t == nil {
			return rows, fmt.Errorf("captured changes for a table that is not synced (oid %d): RESET and EXECUTE again", oid)
		}
		d := e.target(t)
		keys := b.keys[oid]
		types := pkTypes(t)
		cols := make([][]string, len(t.PrimaryKey))
		for _, k := range keys {
			if len(k) != len(cols) {
				return rows, fmt.Errorf("%s: captured key %v does not match the primary key (%s)", t, k, strings.Join(t.PrimaryKey, ", "))
			}
			for i := range cols {
				cols[i] = append(cols[i], k[i])
			}
		}
		args := make([]any, len(cols))
		aliases := make([]string, len(cols))
		params := make([]string, len(cols))
		conds := make([]string, len(cols))
		for i := range cols {
			args[i] = cols[i]
			aliases[i] = fmt.Sprintf("c%d", i+1)
			params[i] = fmt.Sprintf("$%d::text[]", i+1)
			conds[i] = fmt.Sprintf("d.%s = k.c%d::%s", pgx.Identifier{t.PrimaryKey[i]}.Sanitize(), i+1, types[i])
		}
		del := fmt.Sprintf("DELETE FROM %s d USING unnest(%s) AS k(%s) WHERE %s",
			d.QName(), strings.Join(params, ", "), strings.Join(aliases, ", "), strings.Join(conds, " AND "))
		if _, err := dst.Exec(ctx, del, args...); err != nil {
			return rows, fmt.Errorf("%s: delete changed keys in the target: %w", t, err)
		}
		wcols := t.WritableColumns()
		pk := make([]string, len(t.PrimaryKey))
		casts := make([]string, len(t.PrimaryKey))
		for i, c := range t.PrimaryKey {
			pk[i] = "s." + pgx.Identifier{c}.Sanitize()
			casts[i] = fmt.Sprintf("c.k[%d]::%s", i+1, types[i])
		}
		srcSQL := fmt.Sprintf("COPY (SELECT %s FROM ONLY %s s WHERE (%s) IN (SELECT %s FROM %s c WHERE c.tbl = %d AND c.id <= %d)) TO STDOUT",
			columnList(wcols, "s."), t.QName(), strings.Join(pk, ", "), strings.Join(casts, ", "), e.capture().ChangesTable(), oid, b.maxID)
		dstSQL := fmt.Sprintf("COPY %s (%s) FROM STDIN", d.QName(), columnList(wcols, ""))
		n, err := pipeCopy(ctx, src, srcSQL, dst.Conn().PgConn(), dstSQL, nil)
		if err != nil {
			return rows, fmt.Errorf("%s: copy changed rows: %w", t, err)
		}
		rows += n
	}
	return rows, nil
}

// RoundResult describes one incremental round.
type RoundResult struct {
	Changes  int // change rows consumed
	Keys     int // distinct keys applied
	Rows     int64
	Duration time.Duration
}

// Round applies up to limit captured changes: see the package doc.
func (e *Engine) Round(ctx context.Context, src, dst *pgx.Conn, limit int) (RoundResult, error) {
	start := time.Now()
	var res RoundResult
	srcTx, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		return res, err
	}
	defer srcTx.Rollback(context.Background()) //nolint:errcheck
	if err := e.capture().Alive(ctx, srcTx); err != nil {
		return res, err
	}
	b, err := e.readBatch(ctx, srcTx, limit)
	if err != nil || b.changes == 0 {
		return res, err
	}
	res.Changes = b.changes
	for _, ks := range b.keys {
		res.Keys += len(ks)
	}
	err = pgx.BeginFunc(ctx, dst, func(dstTx pgx.Tx) error {
		res.Rows, err = e.apply(ctx, src.PgConn(), dstTx, b)
		return err
	})
	if err != nil {
		return res, err
	}
	if _, err := srcTx.Exec(ctx, "DELETE FROM "+e.capture().ChangesTable()+" WHERE id <= $1", b.maxID); err != nil {
		return res, fmt.Errorf("consume applied changes: %w", err)
	}
	if err := srcTx.Commit(ctx); err != nil {
		return res, fmt.Errorf("consume applied changes: %w", err)
	}
	res.Duration = time.Since(start)
	return res, nil
}

// Backlog is an upper bound of the number of captured changes not yet
// applied (cheap: two index lookups).
func (e *Engine) Backlog(ctx context.Context, src *pgx.Conn) (int64, error) {
	var n int64
	err := src.QueryRow(ctx, "SELECT coalesce(max(id) - min(id) + 1, 0) FROM "+e.capture().ChangesTable()).Scan(&n)
	return n, err
}

// CatchUp runs rounds until the backlog is small: until a round has drained
// everything it could see and took less than quick. The batch size adapts so
// that a round takes a few hundred milliseconds: big enough to amortise the
// round trips, small enough to keep transactions short.
func (e *Engine) CatchUp(ctx context.Context, src, dst *pgx.Conn, quick time.Duration) error {
	limit := 5000
	e.progress().SetPhase("incremental sync", 0, 0)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		backlog, err := e.Backlog(ctx, src)
		if err != nil {
			return err
		}
		e.progress().rowsTotal.Store(e.progress().rowsDone.Load() + backlog)
		res, err := e.Round(ctx, src, dst, limit)
		if err != nil {
			return fmt.Errorf("incremental sync: %w", err)
		}
		e.progress().Add(int64(res.Changes), 0)
		e.log().Debug("swo: incremental round", "changes", res.Changes, "keys", res.Keys, "rows", res.Rows,
			"duration", res.Duration, "backlog", backlog, "limit", limit)
		if res.Changes < limit && res.Duration < quick {
			return nil
		}
		switch {
		case res.Changes == limit && res.Duration < 250*time.Millisecond:
			limit = min(limit*2, 200000)
		case res.Duration > time.Second:
			limit = max(limit/2, 500)
		}
	}
}

// FinalResult describes the final sync.
type FinalResult struct {
	Changes   int
	Rows      int64
	Sequences int
	Duration  time.Duration
}

// Final runs the last round inside the pause. srcTx is the caller's
// transaction on the source, which will commit the switch: Final first locks
// the change table in ACCESS EXCLUSIVE mode, which waits for every
// transaction that captured a change and blocks any further captured write
// until srcTx ends, so the source's synced tables are frozen while Final reads
// them. It applies the remaining changes, carries the sequences over,
// restores foreign keys (NOT VALID) and triggers on the target, and commits
// the target; then it consumes the changes in srcTx. The caller commits srcTx
// after marking the switch in it.
func (e *Engine) Final(ctx context.Context, srcTx pgx.Tx, dst *pgx.Conn) (FinalResult, error) {
	start := time.Now()
	var res FinalResult
	if _, err := srcTx.Exec(ctx, "LOCK TABLE "+e.capture().ChangesTable()+" IN ACCESS EXCLUSIVE MODE"); err != nil {
		return res, fmt.Errorf("final sync: lock the change table: %w", err)
	}
	if err := e.capture().Alive(ctx, srcTx); err != nil {
		return res, err
	}
	b, err := e.readBatch(ctx, srcTx, 0)
	if err != nil {
		return res, err
	}
	res.Changes = b.changes
	err = pgx.BeginFunc(ctx, dst, func(dstTx pgx.Tx) error {
		var err error
		if res.Rows, err = e.apply(ctx, srcTx.Conn().PgConn(), dstTx, b); err != nil {
			return err
		}
		if res.Sequences, err = e.syncSequences(ctx, srcTx, dstTx); err != nil {
			return err
		}
		return e.finishTarget(ctx, dstTx)
	})
	if err != nil {
		return res, fmt.Errorf("final sync: %w", err)
	}
	if b.changes > 0 {
		if _, err := srcTx.Exec(ctx, "DELETE FROM "+e.capture().ChangesTable()+" WHERE id <= $1", b.maxID); err != nil {
			return res, fmt.Errorf("final sync: consume changes: %w", err)
		}
	}
	res.Duration = time.Since(start)
	return res, nil
}

// syncSequences sets every synced sequence of the target to the source's
// state, in one round trip each way.
func (e *Engine) syncSequences(ctx context.Context, src, dst pgx.Tx) (int, error) {
	var names []string
	for _, s := range e.Source.Sequences {
		if s.OwnedBy != "" {
			parts := strings.SplitN(s.OwnedBy, ".", 3)
			if len(parts) == 3 && e.Source.Table(parts[0]+"."+parts[1]) == nil {
				continue // belongs to an excluded table
			}
		}
		names = append(names, s.String())
	}
	if len(names) == 0 {
		return 0, nil
	}
	rows, err := src.Query(ctx, `SELECT schemaname::text, sequencename::text, coalesce(last_value, start_value), last_value IS NOT NULL
FROM pg_sequences WHERE schemaname || '.' || sequencename = ANY($1)`, names)
	if err != nil {
		return 0, fmt.Errorf("read sequences: %w", err)
	}
	var schemas, seqs []string
	var values []int64
	var called []bool
	for rows.Next() {
		var s, n string
		var v int64
		var c bool
		if err := rows.Scan(&s, &n, &v, &c); err != nil {
			return 0, err
		}
		schemas, seqs, values, called = append(schemas, s), append(seqs, n), append(values, v), append(called, c)
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	_, err = dst.Exec(ctx, `SELECT setval(format('%I.%I', s, n)::regclass, v, c)
FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[]) AS x(s, n, v, c)`, schemas, seqs, values, called)
	if err != nil {
		return 0, fmt.Errorf("set sequences: %w", err)
	}
	return len(seqs), nil
}
