package replicate

import "sync"

// loadJob is one job of the initial load: a copy unit, or index records of
// one table to apply in order.
type loadJob struct {
	unit *unit
	recs []undoRecord
	tbl  string // the target table (quoted qualified name)
}

// loadQueue hands out the initial load's jobs: the copy units, largest
// first, and each table's index rebuilds as soon as the last unit of that
// table is in. Ready rebuilds go before copy units: the largest tables are
// copied first and their indexes take longest, so starting them early
// shortens the tail where one worker builds while the others are idle.
//
// A table's rebuilds are split so they can run side by side: each plain
// index is a job of its own (CREATE INDEX takes a SHARE lock, which does
// not conflict with another), while the table's key and exclusion
// constraints form one job applied in order, because each takes an ACCESS
// EXCLUSIVE lock after building its index: two of them on one table at
// once would deadlock, one beside plain index builds only waits for them.
// Records of tables the copy does not load (partitioned parents, whose
// indexes cover their partitions) wait for every unit.
type loadQueue struct {
	mu      sync.Mutex
	cond    *sync.Cond
	units   []unit
	ready   []loadJob
	left    map[string]int       // units not yet copied, by target table
	waiting map[string][]loadJob // rebuilds waiting for their table's units
	unitsTo int                  // copy units not yet done
	running int
	stopped bool
	p       *Progress
	copying bool // the copy phase is on; rebuilds are counted once it ends
	rebuilt int64
	total   int64 // index records
}

func newLoadQueue(units []unit, recs []undoRecord, p *Progress) *loadQueue {
	q := &loadQueue{units: units, left: map[string]int{}, waiting: map[string][]loadJob{},
		unitsTo: len(units), p: p, copying: true, total: int64(len(recs))}
	q.cond = sync.NewCond(&q.mu)
	for _, u := range units {
		q.left[u.dst.QName()]++
	}
	keys := map[string]int{} // table → index of its key job in waiting
	for _, r := range recs {
		if r.kind == undoConstraint {
			if i, ok := keys[r.tbl]; ok {
				q.waiting[r.tbl][i].recs = append(q.waiting[r.tbl][i].recs, r)
				continue
			}
			keys[r.tbl] = len(q.waiting[r.tbl])
		}
		q.waiting[r.tbl] = append(q.waiting[r.tbl], loadJob{recs: []undoRecord{r}, tbl: r.tbl})
	}
	q.release()
	return q
}

// release moves to ready the rebuilds whose table has no unit left (all
// rebuilds once every unit is done). q.mu is held, or q is not shared yet.
func (q *loadQueue) release() {
	for tbl, jobs := range q.waiting {
		left, loaded := q.left[tbl] // a table the copy does not load waits for every unit
		if left == 0 && (loaded || q.unitsTo == 0) {
			q.ready = append(q.ready, jobs...)
			delete(q.waiting, tbl)
		}
	}
	if q.unitsTo == 0 && q.copying {
		q.copying = false
		q.p.SetPhase(PhaseRebuildIndexes, q.total, 0)
		q.p.Add(q.rebuilt, 0)
	}
	q.cond.Broadcast()
}

// next returns the next job, waiting while none is ready but some are
// running (their end may release rebuilds); false when all are done or the
// queue was stopped.
func (q *loadQueue) next() (loadJob, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		switch {
		case q.stopped:
			return loadJob{}, false
		case len(q.ready) > 0:
			j := q.ready[0]
			q.ready = q.ready[1:]
			q.running++
			return j, true
		case len(q.units) > 0:
			u := q.units[0]
			q.units = q.units[1:]
			q.running++
			return loadJob{unit: &u, tbl: u.dst.QName()}, true
		case q.running == 0 && len(q.waiting) == 0:
			return loadJob{}, false
		}
		q.cond.Wait()
	}
}

// done records that j is done.
func (q *loadQueue) done(j loadJob) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.running--
	if j.unit != nil {
		q.left[j.tbl]--
		q.unitsTo--
	} else {
		q.rebuilt += int64(len(j.recs))
		if !q.copying {
			q.p.Add(int64(len(j.recs)), 0)
		}
	}
	q.release()
}

// copied reports whether every copy unit has been handed out.
func (q *loadQueue) copied() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.units) == 0
}

// stop makes next return false to every worker (one failed).
func (q *loadQueue) stop() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.stopped = true
	q.cond.Broadcast()
}
