package replicate

import (
	"context"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgswo/swo/internal/capture"
	"github.com/pgswo/swo/internal/schema"
)

// batch is the set of distinct captured keys of one round, by table oid.
type batch struct {
	changes int   // change rows read (with duplicates)
	maxID   int64 // highest change id read
	keys    map[uint32][][]string
}

// changesSQL selects up to limit change rows (all if limit <= 0), oldest first.
func (e *Engine) changesSQL(limit int) string {
	sql := "SELECT id, tbl, k FROM " + e.capture().ChangesTable() + " ORDER BY id"
	if limit > 0 {
		sql += fmt.Sprintf(" LIMIT %d", limit)
	}
	return sql
}

// collectBatch reads change rows into a batch of distinct keys per table.
func collectBatch(rows pgx.Rows) (*batch, error) {
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
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read captured changes: %w", err)
	}
	return b, nil
}

// tables returns the batch's tables in oid order (a deterministic order).
func (e *Engine) tables(b *batch) ([]*schema.Table, error) {
	oids := make([]uint32, 0, len(b.keys))
	for oid := range b.keys {
		oids = append(oids, oid)
	}
	sort.Slice(oids, func(i, j int) bool { return oids[i] < oids[j] })
	out := make([]*schema.Table, len(oids))
	for i, oid := range oids {
		if out[i] = e.Source.TableByOID(oid); out[i] == nil {
			return nil, fmt.Errorf("captured changes for a table that is not synced (oid %d): RESET and EXECUTE again", oid)
		}
	}
	return out, nil
}

// queueDeletes queues, on the target, the deletion of every key of the batch.
func (e *Engine) queueDeletes(q *pgx.Batch, b *batch, tables []*schema.Table) error {
	for _, t := range tables {
		keys := b.keys[t.OID]
		types := pkTypes(t)
		cols := make([][]string, len(t.PrimaryKey))
		for _, k := range keys {
			if len(k) != len(cols) {
				return fmt.Errorf("%s: captured key %v does not match the primary key (%s)", t, k, strings.Join(t.PrimaryKey, ", "))
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
		q.Queue(fmt.Sprintf("DELETE FROM ONLY %s d USING unnest(%s) AS k(%s) WHERE %s",
			e.target(t).QName(), strings.Join(params, ", "), strings.Join(aliases, ", "), strings.Join(conds, " AND ")), args...)
	}
	return nil
}

// copyRows inserts into the target (in its open transaction) the rows the
// source holds now (in its open transaction) for the batch's keys.
func (e *Engine) copyRows(ctx context.Context, src, dst *pgconn.PgConn, b *batch, tables []*schema.Table) (rows int64, err error) {
	for _, t := range tables {
		types := pkTypes(t)
		wcols := t.WritableColumns()
		pk := make([]string, len(t.PrimaryKey))
		casts := make([]string, len(t.PrimaryKey))
		for i, c := range t.PrimaryKey {
			pk[i] = "s." + pgx.Identifier{c}.Sanitize()
			casts[i] = fmt.Sprintf("c.k[%d]::%s", i+1, types[i])
		}
		srcSQL := fmt.Sprintf("COPY (SELECT %s FROM ONLY %s s WHERE (%s) IN (SELECT %s FROM %s c WHERE c.tbl = %d AND c.id <= %d)) TO STDOUT",
			columnList(wcols, "s."), t.QName(), strings.Join(pk, ", "), strings.Join(casts, ", "), e.capture().ChangesTable(), t.OID, b.maxID)
		dstSQL := fmt.Sprintf("COPY %s (%s) FROM STDIN", e.target(t).QName(), columnList(wcols, ""))
		n, err := pipeCopy(ctx, src, srcSQL, dst, dstSQL, nil)
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
	Backlog  int64 // the backlog the round saw (an upper bound, see Backlog)
	Duration time.Duration
}

// Round applies up to limit captured changes: see the package doc.
//
// A round costs the source two round trips and one per table it touches
// (each COPY of changed rows), and the target as many: over a slow link the
// round trips, not the rows, are the cost of a round, so CatchUp makes
// rounds big when the link is slow (see CatchUp).
func (e *Engine) Round(ctx context.Context, src, dst *pgx.Conn, limit int) (res RoundResult, err error) {
	start := time.Now()
	defer func() {
		// An error inside a batch leaves a transaction open or aborted.
		for _, c := range []*pgx.Conn{src, dst} {
			if err != nil && !c.IsClosed() && c.PgConn().TxStatus() != 'I' {
				_, _ = c.Exec(context.Background(), "ROLLBACK")
			}
		}
	}()
	// Source, one round trip: the snapshot, the guard, capture intact, the
	// backlog and the changes.
	var (
		ok, alive = true, false
		b         *batch
	)
	q := &pgx.Batch{}
	q.Queue("BEGIN ISOLATION LEVEL REPEATABLE READ")
	if e.Guard != "" {
		q.Queue(e.Guard).QueryRow(func(r pgx.Row) error { return r.Scan(&ok) })
	}
	q.Queue(e.capture().AliveSQL()).QueryRow(func(r pgx.Row) error { return r.Scan(&alive) })
	q.Queue(backlogSQL(e.capture().ChangesTable())).QueryRow(func(r pgx.Row) error { return r.Scan(&res.Backlog) })
	q.Queue(e.changesSQL(limit)).Query(func(rows pgx.Rows) (err error) { b, err = collectBatch(rows); return err })
	if err := src.SendBatch(ctx, q).Close(); err != nil {
		return res, fmt.Errorf("read captured changes: %w", err)
	}
	switch {
	case !ok:
		return res, ErrOvertaken
	case !alive:
		return res, capture.ErrLost
	}
	if b.changes == 0 {
		_, err = src.Exec(ctx, "COMMIT")
		res.Duration = time.Since(start)
		return res, err
	}
	res.Changes = b.changes
	for _, ks := range b.keys {
		res.Keys += len(ks)
	}
	tables, err := e.tables(b)
	if err != nil {
		return res, err
	}
	// Target: [begin, deletes, the applied count], the rows, [commit].
	// synchronous_commit on: the source consumes the changes once the target
	// has committed them, so that commit must survive a crash.
	q = &pgx.Batch{}
	q.Queue("BEGIN")
	q.Queue("SET LOCAL synchronous_commit = on")
	if err := e.queueDeletes(q, b, tables); err != nil {
		return res, err
	}
	q.Queue(e.bumpSQL())
	if err := dst.SendBatch(ctx, q).Close(); err != nil {
		return res, fmt.Errorf("delete changed keys in the target: %w", err)
	}
	if res.Rows, err = e.copyRows(ctx, src.PgConn(), dst.PgConn(), b, tables); err != nil {
		return res, err
	}
	if _, err := dst.Exec(ctx, "COMMIT"); err != nil {
		return res, fmt.Errorf("commit the round in the target: %w", err)
	}
	e.applied.Add(1)
	// Source, one round trip: consume what the target committed. If this
	// fails the changes are applied again by the next round (or the final
	// sync): applying a key twice leaves the same row.
	q = &pgx.Batch{}
	q.Queue("DELETE FROM "+e.capture().ChangesTable()+" WHERE id <= $1", b.maxID)
	q.Queue("COMMIT")
	if err := src.SendBatch(ctx, q).Close(); err != nil {
		return res, fmt.Errorf("consume applied changes: %w", err)
	}
	res.Duration = time.Since(start)
	return res, nil
}

func backlogSQL(changes string) string {
	return "SELECT coalesce(max(id) - min(id) + 1, 0) FROM " + changes
}

// Backlog is an upper bound of the number of captured changes not yet
// applied (cheap: two index lookups).
func (e *Engine) Backlog(ctx context.Context, src *pgx.Conn) (int64, error) {
	var n int64
	err := src.QueryRow(ctx, backlogSQL(e.capture().ChangesTable())).Scan(&n)
	return n, err
}

// ErrCannotKeepUp is returned by CatchUp when the writers capture changes
// faster than rounds of the largest size apply them, round after round.
var ErrCannotKeepUp = errors.New("the incremental sync cannot keep up with the writes: the backlog of captured changes grows even with the largest rounds " +
	"(is the link to a database slow or saturated, or the new database's disk?); " +
	"RESET, and EXECUTE again when the write load is lower or the link is faster")

// Batch sizes of CatchUp's rounds, and how many rounds of the largest size
// may lose ground in a row before it gives up.
const (
	minRound        = 1000
	firstRound      = 5000
	maxRound        = 200000
	losingRoundsMax = 20
)

// CatchUp runs rounds until the backlog is small: until a round has drained
// everything it could see and took less than quick (or three rounds in a
// row drained what they saw, however long they took: on a loaded machine or
// a slow link a round may never be quick, what it leaves is what arrives
// while it runs, and the final sync has its own timeout).
//
// The batch size adapts. A full round that was quick, or after which the
// backlog had grown, doubles it: the fixed cost of a round (its round trips,
// 400 ms each over a link with 200 ms of latency) is paid fewer times per
// change. A full round that took more than 5 s while the backlog shrank
// halves it, to keep transactions short when that costs nothing. If the
// backlog still grows after losingRoundsMax rounds of the largest size (and
// an exact count confirms it), the writers outrun the sync and CatchUp
// returns ErrCannotKeepUp rather than syncing for ever.
func (e *Engine) CatchUp(ctx context.Context, src, dst *pgx.Conn, quick time.Duration) error {
	size := newRoundSizer()
	drained := 0
	var streakStart int64 // the exact backlog when the losing streak started
	e.progress().SetPhase(PhaseIncremental, 0, 0)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		limit := size.limit
		res, err := e.Round(ctx, src, dst, limit)
		if err != nil {
			return err
		}
		e.progress().rowsTotal.Store(e.progress().rowsDone.Load() + res.Backlog)
		e.progress().Add(int64(res.Changes), 0)
		e.log().Debug("incremental round", "changes", res.Changes, "keys", res.Keys, "rows", res.Rows,
			"duration", res.Duration, "backlog", res.Backlog, "limit", limit)
		if res.Changes < limit {
			drained++
			if res.Duration < quick || drained >= 3 {
				return nil
			}
		} else {
			drained = 0
		}
		if err := size.next(res); err != nil {
			// The backlog is measured as a range of change ids, which also
			// counts ids of rolled-back writes: count exactly before giving up.
			n, cerr := e.exactBacklog(ctx, src)
			if cerr != nil || n > streakStart {
				return err
			}
			size.losing = 0
		}
		if size.losing == 1 {
			if streakStart, err = e.exactBacklog(ctx, src); err != nil {
				return err
			}
		}
	}
}

// exactBacklog counts the captured changes not yet applied (a scan of the
// change table: CatchUp runs it only to confirm that it is losing ground).
func (e *Engine) exactBacklog(ctx context.Context, src *pgx.Conn) (int64, error) {
	var n int64
	err := src.QueryRow(ctx, "SELECT count(*) FROM "+e.capture().ChangesTable()).Scan(&n)
	return n, err
}

// roundSizer adapts the size of CatchUp's rounds (see CatchUp).
type roundSizer struct {
	limit  int
	losing int   // full rounds of the largest size in a row after which the backlog had grown
	prev   int64 // the previous round's backlog; -1 before the first
}

func newRoundSizer() *roundSizer { return &roundSizer{limit: firstRound, prev: -1} }

// next takes the result of a round of size s.limit and sets the size of
// the next one, or returns ErrCannotKeepUp.
func (s *roundSizer) next(res RoundResult) error {
	full := res.Changes >= s.limit
	grew := s.prev >= 0 && res.Backlog > s.prev
	s.prev = res.Backlog
	switch {
	case full && grew && s.limit == maxRound:
		if s.losing++; s.losing >= losingRoundsMax {
			return fmt.Errorf("%w (%d changes behind after %d rounds of %d)", ErrCannotKeepUp, res.Backlog, s.losing, s.limit)
		}
		return nil
	case full && (grew || res.Duration < 250*time.Millisecond):
		s.limit = min(s.limit*2, maxRound)
	case full && res.Duration > 5*time.Second:
		s.limit = max(s.limit/2, minRound)
	}
	s.losing = 0
	return nil
}

// FinalResult describes the final sync.
type FinalResult struct {
	Changes   int
	Rows      int64
	Sequences int
	Duration  time.Duration
	// Consume deletes the applied changes: the caller runs it in the source
	// transaction (with the statements that mark the switch).
	Consume string
	// seqs are the moved sequences' states as read, for FreezeSequences.
	seqs seqValues
}

// Final runs the last round inside the pause, in few round trips. srcTx is
// the caller's transaction on the source, which will commit the switch:
// Final first locks the change table in ACCESS EXCLUSIVE mode, which waits for
// every transaction that captured a change and blocks any further captured
// write until srcTx ends, so the source's synced tables are frozen while
// Final reads them; it checks that capture is intact, that no DDL changed
// what it captures (e.Shape) and that no refused kind of object appeared
// (e.RefusedNow). It applies the remaining changes, carries the
// sequences over, restores foreign keys (NOT VALID) and triggers on the
// target, and commits the target. The caller then runs res.Consume and
// commits srcTx after marking the switch in it, and then FreezeSequences.
//
// Sequences are read, not locked: nextval does not wait for the change
// table's lock, and a writer that bypasses the connector holds its
// sequence's lock from its nextval to its commit, so a lock on the sequences
// here could deadlock with a writer waiting for the change table.
// FreezeSequences closes the gap after the switch.
func (e *Engine) Final(ctx context.Context, srcTx pgx.Tx, dst *pgx.Conn) (res FinalResult, err error) {
	start := time.Now()
	// Source, one round trip: lock, capture intact, shape, refused
	// objects, changes, sequences.
	var (
		alive, intact bool
		shape         schema.Shape
		refused       []string
		b             *batch
		seqs          seqValues
	)
	timeout := e.FinalTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	q := &pgx.Batch{}
	// The lock waits for every writer that captured a change; the service
	// is paused meanwhile, so the wait has the pause's budget, not the final
	// sync's (a prepared transaction, or a writer that bypasses the
	// connector and idles in its transaction, would hold it for ever).
	if e.LockBudget > 0 {
		q.Queue(fmt.Sprintf("SET LOCAL lock_timeout = %d", max(e.LockBudget.Milliseconds(), 1)))
	}
	e.queueLockPremade(q)
	q.Queue("LOCK TABLE " + e.capture().ChangesTable() + " IN ACCESS EXCLUSIVE MODE")
	e.queueLockParents(q)
	if e.LockBudget > 0 { // back to the final sync's bound
		q.Queue(fmt.Sprintf("SET LOCAL lock_timeout = %d", timeout.Milliseconds()))
	}
	var premadeFailed []string
	e.queueCheckPremade(q, &premadeFailed)
	q.Queue(e.capture().AliveSQL()).QueryRow(func(r pgx.Row) error { return r.Scan(&alive) })
	q.Queue(e.capture().IntactSQL(e.Source.Tables)).QueryRow(func(r pgx.Row) error { return r.Scan(&intact) })
	if e.ShapeSQL != "" {
		q.Queue(e.ShapeSQL).Query(func(rows pgx.Rows) (err error) { shape, err = schema.CollectShape(rows, e.Exclude); return err })
	}
	if e.RefusedNow != "" {
		q.Queue(e.RefusedNow).QueryRow(func(r pgx.Row) error { return r.Scan(&refused) })
	}
	q.Queue(e.changesSQL(0)).Query(func(rows pgx.Rows) (err error) { b, err = collectBatch(rows); return err })
	for _, sql := range sequencesSQL(e.Source.Sequences) {
		q.Queue(sql).Query(func(rows pgx.Rows) error { return seqs.collect(rows, e.Source.Sequences) })
	}
	if err := srcTx.SendBatch(ctx, q).Close(); err != nil {
		return res, fmt.Errorf("final sync: read the source: %w", err)
	}
	if !alive {
		return res, capture.ErrLost
	}
	if !intact {
		return res, fmt.Errorf("%w: a capture trigger was dropped or disabled", ErrSchemaChanged)
	}
	if e.ShapeSQL != "" {
		newParts, changed := e.Shape.NewPartitions(shape, e.partitionedOIDs())
		if changed != "" {
			return res, fmt.Errorf("%w: %s", ErrSchemaChanged, changed)
		}
		if err := e.checkPremade(newParts, premadeFailed); err != nil {
			return res, err
		}
	}
	if len(refused) > 0 {
		return res, fmt.Errorf("%w: %s", ErrRefusedAppeared, strings.Join(refused, ", "))
	}
	parts := slices.Clone(e.premade)
	res.seqs = seqs
	res.Changes, res.Sequences = b.changes, len(seqs.index)
	tables, err := e.tables(b)
	if err != nil {
		return res, err
	}

	// Target: [begin, deletes, undo records], the rows, [sequences, keys and
	// triggers back, commit].
	defer func() {
		if err != nil && dst.PgConn().TxStatus() != 'I' {
			_, _ = dst.Exec(context.Background(), "ROLLBACK")
		}
	}()
	var recs []undoRecord
	var commits int64
	q = &pgx.Batch{}
	q.Queue("BEGIN")
	q.Queue(fmt.Sprintf("SET LOCAL statement_timeout = %d", timeout.Milliseconds()))
	q.Queue("SET LOCAL synchronous_commit = on") // the final rows must survive a crash of the new database
	q.Queue("SELECT commits FROM " + e.q("target_applied")).QueryRow(func(r pgx.Row) error { return r.Scan(&commits) })
	if err := e.queueDeletes(q, b, tables); err != nil {
		return res, err
	}
	q.Queue("SELECT id, tbl, kind, name, restore FROM "+e.q("target_undo")+" WHERE kind = ANY($1) ORDER BY id", []string{undoFK, undoTrigger}).
		Query(func(rows pgx.Rows) (err error) { recs, err = collectUndo(rows); return err })
	e.queueReadTarget(q, parts)
	if err := dst.SendBatch(ctx, q).Close(); err != nil {
		return res, fmt.Errorf("final sync: %w", err)
	}
	if want := e.applied.Load(); commits != want {
		return res, fmt.Errorf("%w (it holds %d of the run's %d commits)", ErrTargetLost, commits, want)
	}
	if res.Rows, err = e.copyRows(ctx, srcTx.Conn().PgConn(), dst.PgConn(), b, tables); err != nil {
		return res, fmt.Errorf("final sync: %w", err)
	}
	q = &pgx.Batch{}
	if len(seqs.index) > 0 {
		names := make([]string, len(seqs.index))
		for i, j := range seqs.index {
			names[i] = e.Source.Sequences[j].QName()
		}
		q.Queue(setSequencesSQL, names, seqs.values, seqs.called)
	}
	if err := e.queueNewPartitions(q, parts); err != nil {
		return res, fmt.Errorf("final sync: %w", err)
	}
	e.queueFinish(q, recs)
	q.Queue("COMMIT")
	if err := dst.SendBatch(ctx, q).Close(); err != nil {
		return res, fmt.Errorf("final sync: finish the target: %w", err)
	}
	if b.changes > 0 {
		res.Consume = fmt.Sprintf("DELETE FROM %s WHERE id <= %d", e.capture().ChangesTable(), b.maxID)
	}
	res.Duration = time.Since(start)
	return res, nil
}

// FreezeSequences runs after the switch committed: it makes each moved
// sequence refuse nextval in the old database, as the change table's
// trigger makes every captured write fail, and moves the new database's
// sequence forward if the old one handed out values after the final sync
// read it (a writer that bypasses the connector). Each sequence is frozen in
// a transaction of its own, so that no lock of the library's is held while
// it waits for one (no deadlock): ALTER SEQUENCE waits for the transactions
// that drew from it, locks out nextval, and its bounds are closed around
// its last value, which it then holds as handed out (is_called), so that
// its next value lies outside them. (An is_called false sequence returns its
// last value without a bounds check; setval to the value before it, with
// is_called, means the same next value.) A sequence at its type's very end
// keeps its bounds. A sequence whose lock is held (a writer's transaction
// still open) is retried until ctx ends; the error names those left.
func (e *Engine) FreezeSequences(ctx context.Context, res FinalResult) error {
	if len(res.seqs.index) == 0 {
		return nil
	}
	src, err := Connect(ctx, e.Src)
	if err != nil {
		return err
	}
	defer closeQuietly(src)
	dst, err := Connect(ctx, e.Dst)
	if err != nil {
		return err
	}
	defer closeQuietly(dst)
	pending := make([]int, len(res.seqs.index))
	for i := range pending {
		pending[i] = i
	}
	backoff := 100 * time.Millisecond
	for {
		var errs []error
		var left []int
		for _, i := range pending {
			s := e.Source.Sequences[res.seqs.index[i]]
			copied := nextValue(res.seqs.values[i], res.seqs.called[i], s.Increment)
			if err := freezeSequence(ctx, src, dst, s, copied); err != nil {
				errs = append(errs, fmt.Errorf("sequence %s: %w", s, err))
				left = append(left, i)
			}
		}
		if len(left) == 0 {
			return nil
		}
		pending = left
		select {
		case <-ctx.Done():
			return errors.Join(errs...)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func closeQuietly(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn.Close(ctx)
}

// nextValue is the value nextval hands out next (big: it may be past the
// type's end).
func nextValue(last int64, called bool, inc int64) *big.Int {
	v := big.NewInt(last)
	if called {
		v.Add(v, big.NewInt(inc))
	}
	return v
}

// catchUpSteps bounds how many values FreezeSequences draws in the new
// database to move a sequence forward one nextval at a time.
const catchUpSteps = 100000

func freezeSequence(ctx context.Context, src, dst *pgx.Conn, s *schema.Sequence, copied *big.Int) error {
	var last int64
	var called bool
	err := pgx.BeginFunc(ctx, src, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '1s'; ALTER SEQUENCE "+s.QName()+" NO CYCLE"); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, "SELECT last_value, is_called FROM "+s.QName()).Scan(&last, &called); err != nil {
			return err
		}
		inc, m := s.Increment, last
		if !called {
			if (inc > 0 && last < s.TypeMin+inc) || (inc < 0 && last > s.TypeMax+inc) {
				return nil
			}
			m = last - inc
		}
		lo, hi := m-1, m
		if inc < 0 {
			lo, hi = m, m+1
		}
		if (inc > 0 && m == s.TypeMin) || (inc < 0 && m == s.TypeMax) {
			return nil
		}
		_, err := tx.Exec(ctx, fmt.Sprintf("ALTER SEQUENCE %s NO CYCLE MINVALUE %d MAXVALUE %d START %d RESTART %d; SELECT pg_catalog.setval(%d, %d, true)",
			s.QName(), lo, hi, m, m, s.OID, m))
		return err
	})
	if err != nil {
		return fmt.Errorf("freeze it in the old database: %w", err)
	}
	// Values handed out in the old database since the final sync read it
	// must not be handed out again: draw them in the new database too. One
	// nextval at a time never moves a sequence backwards, whatever the
	// service draws meanwhile (a setval could).
	ahead := new(big.Int).Sub(nextValue(last, called, s.Increment), copied)
	steps := ahead.Div(ahead, big.NewInt(s.Increment))
	if steps.Sign() <= 0 {
		return nil
	}
	if !steps.IsInt64() || steps.Int64() > catchUpSteps {
		return fmt.Errorf("the old database handed out %s values after the final sync read it: too many to draw again in the new database; set it forward there by hand", steps)
	}
	_, err = dst.Exec(ctx, `SELECT pg_catalog.max(pg_catalog.nextval($1::pg_catalog.regclass)) FROM pg_catalog.generate_series(1, $2)`,
		s.QName(), steps.Int64())
	if err != nil {
		return fmt.Errorf("move it forward in the new database: %w", err)
	}
	return nil
}

// sequencesSQL reads the state of the sequences from each sequence itself,
// as pg_dump does: last_value and is_called. (pg_sequences.last_value is
// NULL when is_called is false, as after ALTER SEQUENCE … RESTART or
// setval(s, n, false), and its start_value is not the value to restore.)
func sequencesSQL(seqs []*schema.Sequence) []string {
	// In chunks: one UNION ALL of every sequence takes a time to plan that
	// grows with the square of their number (0.6 s for 1,500).
	const chunk = 50
	var out []string
	for lo := 0; lo < len(seqs); lo += chunk {
		var parts []string
		for i := lo; i < min(lo+chunk, len(seqs)); i++ {
			parts = append(parts, fmt.Sprintf("SELECT %d, last_value, is_called FROM %s", i, seqs[i].QName()))
		}
		out = append(out, strings.Join(parts, " UNION ALL "))
	}
	return out
}

const setSequencesSQL = `SELECT setval(n::regclass, v, c)
FROM unnest($1::text[], $2::int8[], $3::bool[]) AS x(n, v, c)`

// seqValues are the states of sequences, column-wise for setSequencesSQL.
type seqValues struct {
	index  []int // into the sequences read
	values []int64
	called []bool
}

// collect adds the rows of sequencesSQL(seqs) to v.
func (v *seqValues) collect(rows pgx.Rows, seqs []*schema.Sequence) error {
	defer rows.Close()
	for rows.Next() {
		var i int
		var x int64
		var c bool
		if err := rows.Scan(&i, &x, &c); err != nil {
			return err
		}
		v.index, v.values, v.called = append(v.index, i), append(v.values, x), append(v.called, c)
	}
	return rows.Err()
}
