package replicate

import (
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/pgswo/swo/internal/schema"
)

func TestLoadQueueOrder(t *testing.T) {
	t.Parallel()
	big := &schema.Table{Schema: "public", Name: "big"}
	small := &schema.Table{Schema: "public", Name: "small"}
	other := &schema.Table{Schema: "public", Name: "other"}
	units := []unit{{src: big, dst: big, lo: 0, hi: 10}, {src: big, dst: big, lo: 10, hi: -1}, {src: small, dst: small, whole: true}, {src: other, dst: other, whole: true}}
	rec := func(id int32, tbl *schema.Table, kind, name string) undoRecord {
		return undoRecord{id: id, tbl: tbl.QName(), kind: kind, name: name}
	}
	parent := &schema.Table{Schema: "public", Name: "parted"} // loaded through its partitions: no unit of its own
	recs := []undoRecord{
		rec(1, big, undoConstraint, "big_pkey"), rec(2, big, undoConstraint, "big_email_key"),
		rec(3, small, undoConstraint, "small_pkey"), rec(4, parent, undoConstraint, "parted_pkey"),
		rec(5, big, undoIndex, "big_a"), rec(6, big, undoIndex, "big_b"), rec(7, small, undoIndex, "small_a"),
	}
	p := &Progress{}
	q := newLoadQueue(units, recs, p)
	name := func(j loadJob) string {
		if j.unit != nil {
			return "copy " + j.unit.src.Name
		}
		var names []string
		for _, r := range j.recs {
			names = append(names, r.name)
		}
		return "rebuild " + strings.Join(names, ",")
	}
	take := func(want string) loadJob {
		t.Helper()
		j, ok := q.next()
		if !ok || name(j) != want {
			t.Fatalf("next: got %q (%v), want %q", name(j), ok, want)
		}
		return j
	}

	u1 := take("copy big")
	u2 := take("copy big")
	q.done(u1) // big has a unit left: nothing released
	u3 := take("copy small")
	q.done(u2) // big is in: its keys (one job, in order) and each plain index, before the next unit
	k := take("rebuild big_pkey,big_email_key")
	a := take("rebuild big_a")
	b := take("rebuild big_b")
	u4 := take("copy other")
	q.done(u4)
	if p.Snapshot().Phase != "" {
		t.Fatalf("phase %q during the copy, want the caller's", p.Snapshot().Phase)
	}
	q.done(k)
	q.done(u3) // the last unit: small's rebuilds, and then the parent's
	if s := p.Snapshot(); s.Phase != PhaseRebuildIndexes || s.RowsTotal != 7 || s.RowsDone != 2 {
		t.Fatalf("after the copy: %+v, want phase %q with 2 of 7 records done", s, PhaseRebuildIndexes)
	}
	var rest []string
	q.done(a)
	q.done(b)
	for {
		j, ok := q.next()
		if !ok {
			break
		}
		rest = append(rest, name(j))
		q.done(j)
	}
	slices.Sort(rest)
	want := []string{"rebuild parted_pkey", "rebuild small_a", "rebuild small_pkey"}
	if !slices.Equal(rest, want) {
		t.Fatalf("the remaining jobs: %q, want %q", rest, want)
	}
	if s := p.Snapshot(); s.RowsDone != 7 {
		t.Fatalf("records done %d, want 7", s.RowsDone)
	}
}

// TestLoadQueueWorkers runs the queue with several workers and checks that
// every job is handed out once and that no table's rebuild starts before its
// last unit is done.
func TestLoadQueueWorkers(t *testing.T) {
	t.Parallel()
	var units []unit
	var recs []undoRecord
	for i := range 20 {
		tb := &schema.Table{Schema: "s", Name: string(rune('a' + i))}
		for range 1 + i%3 {
			units = append(units, unit{src: tb, dst: tb})
		}
		for k := range 3 {
			kind := undoIndex
			if k == 0 {
				kind = undoConstraint
			}
			recs = append(recs, undoRecord{id: int32(len(recs) + 1), tbl: tb.QName(), kind: kind, name: tb.Name + string(rune('0'+k))})
		}
	}
	unitsOf := map[string]int{}
	for _, u := range units {
		unitsOf[u.dst.QName()]++
	}
	q := newLoadQueue(units, recs, &Progress{})
	var (
		mu      sync.Mutex
		copied  = map[string]int{}
		rebuilt []string
		wg      sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for {
				j, ok := q.next()
				if !ok {
					return
				}
				mu.Lock()
				if j.unit != nil {
					copied[j.tbl]++
				} else {
					if copied[j.tbl] != unitsOf[j.tbl] {
						t.Errorf("%s rebuilt after %d of its units", j.tbl, copied[j.tbl])
					}
					for _, r := range j.recs {
						rebuilt = append(rebuilt, r.name)
					}
				}
				mu.Unlock()
				q.done(j)
			}
		})
	}
	wg.Wait()
	if len(rebuilt) != len(recs) {
		t.Fatalf("%d records rebuilt, want %d", len(rebuilt), len(recs))
	}
	slices.Sort(rebuilt)
	if len(slices.Compact(rebuilt)) != len(recs) {
		t.Fatal("a record was rebuilt twice")
	}
}
