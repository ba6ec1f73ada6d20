package replicate

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/errgroup"

	"github.com/pgswo/swo/internal/schema"
)

// unit is one stream of the initial copy: a whole table, or a range of its
// pages (large tables on servers with TID range scans, PostgreSQL 14+).
type unit struct {
	src, dst *schema.Table
	lo, hi   int64 // page range [lo, hi); hi < 0: to the end
	whole    bool
	weight   int64
}

// plan splits the tables into units, largest first.
func (e *Engine) plan() []unit {
	var totalPages int64
	for _, t := range e.Source.Tables {
		totalPages += t.Pages
	}
	chunk := max(totalPages/int64(e.workers()*4), 2048) // at least 16 MB of pages
	var units []unit
	for _, t := range e.Source.Tables {
		d := e.target(t)
		if e.Source.Version < 140000 || t.Pages <= chunk || e.Keep[t.String()] {
			units = append(units, unit{src: t, dst: d, whole: true, weight: t.Pages})
			continue
		}
		for lo := int64(0); lo < t.Pages; lo += chunk {
			hi := lo + chunk
			if hi >= t.Pages {
				hi = -1 // the last range is open: the table may have grown since relpages was counted
			}
			units = append(units, unit{src: t, dst: d, lo: lo, hi: hi, weight: chunk})
		}
	}
	sort.SliceStable(units, func(i, j int) bool { return units[i].weight > units[j].weight })
	return units
}

func (u unit) sourceSQL() string {
	cols := columnList(u.src.WritableColumns(), "")
	if u.whole {
		return fmt.Sprintf("COPY %s (%s) TO STDOUT", u.src.QName(), cols)
	}
	where := fmt.Sprintf("ctid >= '(%d,0)'::tid", u.lo)
	if u.hi >= 0 {
		where += fmt.Sprintf(" AND ctid < '(%d,0)'::tid", u.hi)
	}
	return fmt.Sprintf("COPY (SELECT %s FROM ONLY %s WHERE %s) TO STDOUT", cols, u.src.QName(), where)
}

var snapshotRE = regexp.MustCompile(`^[0-9A-Fa-f-]+$`)

// InitialCopy copies every table from one exported snapshot of the source
// into the prepared target, Workers streams at a time, and rebuilds the
// target's keys and indexes: each table's as soon as its rows are in, beside
// the copy of the others (see loadQueue). Change capture must be installed
// before it starts: the snapshot is taken after, so every write is either in
// the copy or captured (or both, which is harmless). Changes captured before
// the snapshot are already in the copy and are discarded.
func (e *Engine) InitialCopy(ctx context.Context) error {
	coord, err := Connect(ctx, e.Src)
	if err != nil {
		return err
	}
	defer coord.Close(context.Background())
	tx, err := coord.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	if err := e.capture().Alive(ctx, tx); err != nil {
		return err
	}
	var snap string
	if err := tx.QueryRow(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
		return fmt.Errorf("export snapshot: %w", err)
	}
	if !snapshotRE.MatchString(snap) {
		return fmt.Errorf("unexpected snapshot id %q", snap)
	}
	recs, err := e.indexRecords(ctx)
	if err != nil {
		return fmt.Errorf("rebuild indexes: %w", err)
	}

	var rows, bytes int64
	for _, t := range e.Source.Tables {
		rows += max(t.RowsEstimate, 0)
		bytes += t.Bytes
	}
	e.progress().SetPhase(PhaseInitialCopy, rows, bytes)
	units := e.plan()
	q := newLoadQueue(units, recs, e.progress())
	g, gctx := errgroup.WithContext(ctx)
	// The exporting transaction ends as soon as every worker has imported
	// its snapshot (an imported snapshot outlives its exporter), and each
	// worker's once no copy unit is left: none of them holds back vacuum
	// on the old database while indexes are built.
	workers := min(e.workers(), len(units)+len(recs))
	var imported sync.WaitGroup
	imported.Add(workers)
	for range workers {
		g.Go(func() error { return e.loadWorker(gctx, snap, q, imported.Done) })
	}
	g.Go(func() error {
		imported.Wait()
		if gctx.Err() != nil {
			return nil // a worker failed: the group reports it
		}
		if err := e.guard(gctx, tx); err != nil {
			return err
		}
		if _, err := tx.Exec(gctx, "DELETE FROM "+e.capture().ChangesTable()); err != nil {
			return err
		}
		return tx.Commit(gctx)
	})
	go func() { <-gctx.Done(); q.stop() }() // wakes the idle workers when one fails
	if err := g.Wait(); err != nil {
		return fmt.Errorf("initial copy: %w", err)
	}
	return e.guard(ctx, coord) // overtaken meanwhile: say so now
}

// indexRecords reads the keys and indexes Prepare dropped.
func (e *Engine) indexRecords(ctx context.Context) ([]undoRecord, error) {
	conn, err := Connect(ctx, e.Dst)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	return e.undoRecords(ctx, conn, undoConstraint, undoIndex)
}

// loadWorker takes jobs from q until none is left: copy units, in its
// transaction of the exported snapshot, and index rebuilds. It calls
// imported once, when its transaction has the snapshot or it failed first.
func (e *Engine) loadWorker(ctx context.Context, snap string, q *loadQueue, imported func()) error {
	var once sync.Once
	defer once.Do(imported)
	src, err := Connect(ctx, e.Src)
	if err != nil {
		return err
	}
	defer src.Close(context.Background())
	dst, err := Connect(ctx, e.Dst)
	if err != nil {
		return err
	}
	defer dst.Close(context.Background())
	// Commits stay synchronous (one WAL flush per unit): a target that
	// restarted between two steps of the run must not have lost a unit.
	if _, err := dst.Exec(ctx, "SELECT set_config('synchronous_commit', 'on', false), set_config('maintenance_work_mem', $1, false)", e.maintenanceWorkMem()); err != nil {
		return err
	}
	if err := src.PgConn().Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '"+snap+"'").Close(); err != nil {
		return fmt.Errorf("import snapshot: %w", err)
	}
	once.Do(imported)
	inSnapshot := true
	for {
		j, ok := q.next()
		if !ok {
			break
		}
		start := time.Now()
		if j.unit != nil {
			err = e.copyUnit(ctx, src, dst, *j.unit)
		} else {
			if inSnapshot && q.copied() {
				if err := src.PgConn().Exec(ctx, "COMMIT").Close(); err != nil {
					return err
				}
				inSnapshot = false
			}
			e.progress().SetTable(strings.ReplaceAll(j.tbl, `"`, ""))
			err = e.applyAll(ctx, dst, j.recs, PhaseRebuildIndexes, false) // the queue counts them
		}
		if err != nil {
			return err
		}
		e.log().Debug("load job done", "table", j.tbl, "copy", j.unit != nil, "records", len(j.recs), "took", time.Since(start))
		q.done(j)
	}
	if !inSnapshot {
		return nil
	}
	return src.PgConn().Exec(ctx, "COMMIT").Close()
}

// copyUnit copies one unit in one transaction of the target, counted among
// the run's commits.
func (e *Engine) copyUnit(ctx context.Context, src, dst *pgx.Conn, u unit) error {
	e.progress().SetTable(u.src.String())
	dstSQL := fmt.Sprintf("COPY %s (%s) FROM STDIN", u.dst.QName(), columnList(u.src.WritableColumns(), ""))
	begin := "BEGIN"
	if e.Keep[u.src.String()] { // replace the rows in one transaction: an abort leaves the old ones
		begin += "; TRUNCATE ONLY " + u.dst.QName()
	}
	if err := dst.PgConn().Exec(ctx, begin).Close(); err != nil {
		return fmt.Errorf("copy %s: %w", u.src, err)
	}
	if _, err := pipeCopy(ctx, src.PgConn(), u.sourceSQL(), dst.PgConn(), dstSQL, e.progress()); err != nil {
		return fmt.Errorf("copy %s: %w", u.src, err)
	}
	if err := dst.PgConn().Exec(ctx, e.bumpSQL()+"; COMMIT").Close(); err != nil {
		return fmt.Errorf("copy %s: %w", u.src, err)
	}
	e.applied.Add(1)
	return nil
}

// applyAll applies undo records in order (the work of phase what), and
// counts each in the progress if count is set.
func (e *Engine) applyAll(ctx context.Context, dst *pgx.Conn, recs []undoRecord, what string, count bool) error {
	for _, r := range recs {
		if err := e.applyUndo(ctx, dst, r); err != nil {
			return fmt.Errorf("%s: %s %s on %s: %w", what, r.kind, r.name, r.tbl, err)
		}
		if count {
			e.progress().Add(1, 0)
		}
	}
	return nil
}

// maintenanceWorkMem is the setting of index-building and validating
// sessions.
func (e *Engine) maintenanceWorkMem() string {
	if e.MaintenanceWorkMem == "" {
		return "128MB"
	}
	return e.MaintenanceWorkMem
}

// pipeCopy streams COPY ... TO STDOUT on src into COPY ... FROM STDIN on dst,
// through a 64 KiB buffer: memory stays flat whatever the size. It returns
// the rows written.
func pipeCopy(ctx context.Context, src *pgconn.PgConn, srcSQL string, dst *pgconn.PgConn, dstSQL string, p *Progress) (int64, error) {
	pr, pw := io.Pipe()
	srcErr := make(chan error, 1)
	go func() {
		bw := bufio.NewWriterSize(countingWriter{w: pw, p: p}, 64<<10)
		_, err := src.CopyTo(ctx, bw, srcSQL)
		if err == nil {
			err = bw.Flush()
		}
		pw.CloseWithError(err) // nil: the reader sees EOF
		srcErr <- err
	}()
	tag, err := dst.CopyFrom(ctx, pr, dstSQL)
	if err != nil {
		pr.CloseWithError(errors.New("copy into the target failed"))
	}
	if serr := <-srcErr; serr != nil && err == nil {
		err = fmt.Errorf("read from the source: %w", serr)
	}
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}
