package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo"
	"github.com/pgswo/swo/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// screenshotPath is where the test saves the page after the switch (the
// README of the repository shows it).
const screenshotPath = "../../docs/switchover-page.png"

// chromium finds the browser: SWO_TEST_CHROMIUM, else a Chromium or Chrome
// on PATH, else Debian's /usr/bin/chromium. The test fails without one: the
// page is part of the product.
func chromium(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("SWO_TEST_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	t.Fatal("Chromium not found: the switchover page is tested in a real browser. Install it with " +
		"`apt-get install chromium` (Debian; .ci/run does this), put chromium on PATH, or set SWO_TEST_CHROMIUM to its path")
	return ""
}

// node is one instance of the service, serving HTTP in the test process.
type node struct {
	app *app
	srv *httptest.Server
}

func startNode(t *testing.T, ctx context.Context, name, oldURL, nextURL string) *node {
	t.Helper()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", name)
	a, err := newApp(ctx, swo.Config{OldURL: oldURL, NextURL: nextURL, NodeName: name, Version: "test-1.0"}, log)
	if err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(func() {
		srv.Close()
		a.Close()
	})
	return &node{app: a, srv: srv}
}

// writer is the service's traffic during the switch: it creates to-dos
// through the HTTP API of every node in turn and remembers each one the API
// acknowledged.
type writer struct {
	mu     sync.Mutex
	acked  map[int64]string // id -> title
	failed []string
	stop   chan struct{}
	once   sync.Once
	done   chan struct{}
}

func startWriter(ctx context.Context, nodes []*node) *writer {
	w := &writer{acked: map[int64]string{}, stop: make(chan struct{}), done: make(chan struct{})}
	client := &http.Client{Timeout: 30 * time.Second}
	go func() {
		defer close(w.done)
		pace := time.NewTicker(3 * time.Millisecond) // pacing, not synchronisation
		defer pace.Stop()
		for i := 0; i < 100000; i++ {
			select {
			case <-w.stop:
				return
			case <-ctx.Done():
				return
			case <-pace.C:
			}
			n := nodes[i%len(nodes)]
			title := fmt.Sprintf("write %d via node %d", i, i%len(nodes)+1)
			body, _ := json.Marshal(map[string]string{"title": title})
			resp, err := client.Post(n.srv.URL+"/api/todos", "application/json", bytes.NewReader(body))
			if err != nil {
				w.fail(fmt.Sprintf("%s: %v", title, err))
				continue
			}
			var t Todo
			err = json.NewDecoder(resp.Body).Decode(&t)
			resp.Body.Close()
			if resp.StatusCode != http.StatusCreated || err != nil || t.Title != title {
				w.fail(fmt.Sprintf("%s: HTTP %d, %v", title, resp.StatusCode, err))
				continue
			}
			w.mu.Lock()
			w.acked[t.ID] = title
			w.mu.Unlock()
		}
	}()
	return w
}

// halt stops the writer and waits until it has stopped.
func (w *writer) halt() {
	w.once.Do(func() { close(w.stop) })
	<-w.done
}

func (w *writer) fail(msg string) {
	w.mu.Lock()
	w.failed = append(w.failed, msg)
	w.mu.Unlock()
}

func (w *writer) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.acked)
}

// waitFor waits until the writer has n acknowledged writes.
func (w *writer) waitFor(t *testing.T, n int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for w.count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the writer made %d acknowledged writes in %v, want %d (failures: %v)", w.count(), within, n, w.failures())
		}
		select {
		case <-w.done:
			t.Fatalf("the writer stopped after %d writes", w.count())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (w *writer) failures() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.failed...)
}

// byID is the JavaScript expression for the element with that id.
func byID(id string) string { return fmt.Sprintf("document.getElementById(%q)", id) }

// TestSwitchoverPage drives the admin page in headless Chromium through a
// whole switchover of a two-node cluster while a writer keeps writing
// through the service's API, then checks that every acknowledged write is
// in the new database, and saves a screenshot of the page.
func TestSwitchoverPage(t *testing.T) {
	start := time.Now()
	browser := chromium(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	oldDB := pgtest.NewDatabase(t, pgtest.Owner("todo"))
	newDB := pgtest.NewDatabase(t, pgtest.Owner("todo"))
	// The operator migrates the next database first (--migrate-next).
	if _, err := migrateURL(ctx, newDB.URL); err != nil {
		t.Fatal(err)
	}
	nodes := []*node{
		startNode(t, ctx, "web-1", oldDB.URL, newDB.URL), // migrates the old database
		startNode(t, ctx, "web-2", oldDB.URL, newDB.URL),
	}
	// Data that was there before: the copy has something to copy.
	pgtest.Exec(t, oldDB.URL, `INSERT INTO todos (title, done) SELECT 'seed ' || i, i % 3 = 0 FROM generate_series(1, 20000) i`)

	// Cross-site requests cannot press the buttons.
	req, _ := http.NewRequest("POST", nodes[1].srv.URL+"/admin/switchover/reset", nil)
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	req.Header.Set("Origin", "https://evil.example")
	if resp, err := http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("a cross-site POST to reset answered %d, want 403", resp.StatusCode)
		}
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.WindowSize(1280, 1000))
	actx, acancel := chromedp.NewExecAllocator(ctx, opts...)
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx, chromedp.WithErrorf(t.Logf))
	defer bcancel()

	// Start the browser first: listening for events on a context whose
	// browser is not running yet never starts it.
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start Chromium (%s): %v", browser, err)
	}
	// The confirmation before EXECUTE: accept it, remember what it said.
	dialogs := make(chan string, 4)
	go func() {
		for ev, err := range chromedp.Events(bctx, page.JavascriptDialogOpening) {
			if err != nil {
				return
			}
			dialogs <- ev.Message
			go func() {
				_, err := chromedp.Call(bctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: true})
				if err != nil && bctx.Err() == nil {
					t.Errorf("accept the dialog: %v", err)
				}
			}()
		}
	}()

	poll := func(what, expr string, within time.Duration) {
		t.Helper()
		if _, err := chromedp.Run(bctx, chromedp.Poll[bool](expr, chromedp.WithPollingInterval(100*time.Millisecond),
			chromedp.WithPollingTimeout(within))); err != nil {
			body, _ := chromedp.Run(bctx, chromedp.Evaluate[string]("document.body.innerText"))
			t.Fatalf("waiting for %s: %v\nthe page says:\n%s", what, err, body)
		}
	}

	if err := chromedp.Do(bctx, chromedp.Navigate(nodes[0].srv.URL+"/admin/switchover")); err != nil {
		t.Fatalf("open the page: %v", err)
	}
	t.Logf("page open after %v", time.Since(start).Round(time.Millisecond))

	// Every node, alive, with a valid configuration, routing to the old database.
	poll("both nodes listed as alive with a valid configuration",
		`document.querySelectorAll('#nodes tbody tr[data-alive="true"][data-valid="true"][data-routing="old"]').length === 2`, 20*time.Second)
	type row struct{ Name, Version, Alive, Valid, Routing string }
	shown, err := chromedp.Run(bctx, chromedp.Evaluate[[]row](`[...document.querySelectorAll('#nodes tbody tr')].map(tr => ({
		Name: tr.dataset.node, Version: tr.cells[1].textContent, Alive: tr.cells[2].textContent,
		Valid: tr.cells[3].textContent, Routing: tr.cells[4].textContent}))`))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range shown {
		names = append(names, r.Name)
		if r.Version != "test-1.0" || r.Alive != "✓" || r.Valid != "✓" || r.Routing != "old" {
			t.Errorf("node row %+v: want version test-1.0, alive ✓, config valid ✓, routing old", r)
		}
	}
	if strings.Join(names, ",") != "web-1,web-2" && strings.Join(names, ",") != "web-2,web-1" {
		t.Errorf("nodes on the page: %v, want web-1 and web-2", names)
	}
	disabled, err := chromedp.Run(bctx, chromedp.Evaluate[bool](byID("execute")+".disabled"))
	if err != nil || !disabled {
		t.Errorf("EXECUTE is enabled before RESET (err %v)", err)
	}

	// RESET, then idle.
	if err := chromedp.Do(bctx, chromedp.Click(chromedp.ID("reset"), chromedp.NodeEnabled)); err != nil {
		t.Fatal(err)
	}
	poll("RESET to succeed and the state to be idle",
		byID("state")+`.dataset.state === "idle" && !`+byID("execute")+`.disabled && `+byID("result")+`.textContent.includes("RESET succeeded")`, 30*time.Second)
	t.Logf("idle after %v", time.Since(start).Round(time.Millisecond))

	// The service writes throughout.
	w := startWriter(ctx, nodes)
	defer w.halt()
	w.waitFor(t, 20, 20*time.Second)

	// EXECUTE, confirmed.
	if err := chromedp.Do(bctx, chromedp.Click(chromedp.ID("execute"), chromedp.NodeEnabled)); err != nil {
		t.Fatal(err)
	}
	select {
	case msg := <-dialogs:
		if !strings.Contains(msg, "EXECUTE the switchover?") {
			t.Errorf("the confirmation says %q", msg)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no confirmation dialog before EXECUTE")
	}
	// Done: EXECUTE returned once every node confirmed; this node routes to
	// the new database. (The other nodes' rows keep their last report from
	// before they left the old database: their own pages and status say.)
	poll("the switch to complete",
		byID("state")+`.dataset.state === "done" && `+byID("result")+`.textContent.includes("EXECUTE succeeded") && `+
			`document.querySelector('#nodes tbody tr[data-node="web-1"]').dataset.routing === "next" && `+
			byID("db-next")+`.textContent.includes("live") && `+byID("db-old")+`.textContent.includes("obsolete")`, 45*time.Second)
	t.Logf("done after %v", time.Since(start).Round(time.Millisecond))
	poll("the pause length", `!`+byID("t-pause-row")+`.hidden && /\d/.test(`+byID("t-pause")+`.textContent)`, 10*time.Second)
	pause, _ := chromedp.Run(bctx, chromedp.Evaluate[string](byID("t-pause")+".textContent"))
	t.Logf("the page says the service paused for %s", pause)

	// Writes after the switch go to the new database.
	w.waitFor(t, w.count()+20, 20*time.Second)
	w.halt()

	png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.FromSlash(screenshotPath), png, 0o644); err != nil {
		t.Fatal(err)
	}

	// Every node's status endpoint says the same.
	for i, n := range nodes {
		resp, err := http.Get(n.srv.URL + "/admin/switchover/status")
		if err != nil {
			t.Fatal(err)
		}
		var st swo.Status
		err = json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if err != nil || st.State != swo.StateDone || st.Routing != swo.RoutingNext || st.Timings.PauseMS <= 0 {
			t.Errorf("node %d's status: state %v, routing %v, pause %d ms (err %v); want done, next, a pause",
				i+1, st.State, st.Routing, st.Timings.PauseMS, err)
		}
	}

	// Nothing failed, and every acknowledged write is in the new database.
	if f := w.failures(); len(f) > 0 {
		t.Errorf("%d writes failed, want none: %v", len(f), f)
	}
	conn, err := pgx.Connect(ctx, newDB.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	ids := make([]int64, 0, len(w.acked))
	for id := range w.acked {
		ids = append(ids, id)
	}
	rows, err := conn.Query(ctx, "SELECT id, title FROM todos WHERE id = ANY($1)", ids)
	if err != nil {
		t.Fatal(err)
	}
	found, err := pgx.CollectRows(rows, pgx.RowToStructByPos[struct {
		ID    int64
		Title string
	}])
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		if w.acked[f.ID] != f.Title {
			t.Errorf("to-do %d is %q in the new database, acknowledged as %q", f.ID, f.Title, w.acked[f.ID])
		}
	}
	if len(found) != len(ids) {
		t.Errorf("%d of %d acknowledged writes are in the new database", len(found), len(ids))
	}
	var seeds int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM todos WHERE title LIKE 'seed %'").Scan(&seeds); err != nil || seeds != 20000 {
		t.Errorf("the new database holds %d of the 20000 rows written before the switchover (err %v)", seeds, err)
	}
	t.Logf("%d acknowledged writes, all in the new database; %d failed; the test took %v", len(ids), len(w.failures()), time.Since(start).Round(time.Millisecond))
}
