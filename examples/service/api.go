package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Todo is one item of the to-do list, as the API serves it.
type Todo struct {
	ID        int64     `json:"id"`         // assigned by the database
	Title     string    `json:"title"`      // never empty
	Done      bool      `json:"done"`       // ticked off
	CreatedAt time.Time `json:"created_at"` // when it was created
	UpdatedAt time.Time `json:"updated_at"` // when it last changed
}

const todoColumns = "id, title, done, created_at, updated_at"

func scanTodo(row pgx.Row) (Todo, error) {
	var t Todo
	err := row.Scan(&t.ID, &t.Title, &t.Done, &t.CreatedAt, &t.UpdatedAt)
	return t, err
}

// api serves the to-do list from a pool that the connector opened: the
// handlers are plain pgx code; the switchover is invisible to them (during
// the pause a request waits a moment for its connection).
type api struct {
	pool *pgxpool.Pool
	log  *slog.Logger
}

func (a *api) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /api/todos", a.list)
	mux.HandleFunc("POST /api/todos", a.create)
	mux.HandleFunc("GET /api/todos/{id}", a.get)
	mux.HandleFunc("PATCH /api/todos/{id}", a.update)
	mux.HandleFunc("DELETE /api/todos/{id}", a.delete)
}

// list serves GET /api/todos?done=true|false&limit=N (newest first).
func (a *api) list(w http.ResponseWriter, r *http.Request) {
	limit := 100
	if s := r.URL.Query().Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 1000 {
			apiError(w, http.StatusBadRequest, "limit must be 1 to 1000")
			return
		}
		limit = n
	}
	var done *bool
	if s := r.URL.Query().Get("done"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			apiError(w, http.StatusBadRequest, "done must be true or false")
			return
		}
		done = &b
	}
	rows, err := a.pool.Query(r.Context(), "SELECT "+todoColumns+" FROM todos WHERE $1::boolean IS NULL OR done = $1 ORDER BY id DESC LIMIT $2", done, limit)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	todos, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Todo, error) { return scanTodo(row) })
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if todos == nil {
		todos = []Todo{}
	}
	writeJSON(w, http.StatusOK, todos)
}

// create serves POST /api/todos {"title": "…"}; 201 with the new item.
func (a *api) create(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Title string `json:"title"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&in); err != nil || in.Title == "" {
		apiError(w, http.StatusBadRequest, `send {"title": "…"} with a title that is not empty`)
		return
	}
	t, err := scanTodo(a.pool.QueryRow(r.Context(), "INSERT INTO todos (title) VALUES ($1) RETURNING "+todoColumns, in.Title))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	w.Header().Set("Location", fmt.Sprintf("/api/todos/%d", t.ID))
	writeJSON(w, http.StatusCreated, t)
}

// get serves GET /api/todos/{id}.
func (a *api) get(w http.ResponseWriter, r *http.Request) {
	id, ok := todoID(w, r)
	if !ok {
		return
	}
	t, err := scanTodo(a.pool.QueryRow(r.Context(), "SELECT "+todoColumns+" FROM todos WHERE id = $1", id))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

// update serves PATCH /api/todos/{id} {"title"?: "…", "done"?: bool}.
func (a *api) update(w http.ResponseWriter, r *http.Request) {
	id, ok := todoID(w, r)
	if !ok {
		return
	}
	var in struct {
		Title *string `json:"title"`
		Done  *bool   `json:"done"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&in); err != nil || (in.Title != nil && *in.Title == "") {
		apiError(w, http.StatusBadRequest, `send {"title": "…", "done": true|false}, either or both`)
		return
	}
	t, err := scanTodo(a.pool.QueryRow(r.Context(), `UPDATE todos SET title = coalesce($2, title), done = coalesce($3, done), updated_at = now()
WHERE id = $1 RETURNING `+todoColumns, id, in.Title, in.Done))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

// delete serves DELETE /api/todos/{id}; 204.
func (a *api) delete(w http.ResponseWriter, r *http.Request) {
	id, ok := todoID(w, r)
	if !ok {
		return
	}
	tag, err := a.pool.Exec(r.Context(), "DELETE FROM todos WHERE id = $1", id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if tag.RowsAffected() == 0 {
		apiError(w, http.StatusNotFound, "no such to-do")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func todoID(w http.ResponseWriter, r *http.Request) (int64, bool) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		apiError(w, http.StatusBadRequest, "the id must be a number")
		return 0, false
	}
	return id, true
}

// fail answers a database error: 404 for a missing row, else 503 (the
// details go to the log, not to the client).
func (a *api) fail(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, pgx.ErrNoRows) {
		apiError(w, http.StatusNotFound, "no such to-do")
		return
	}
	a.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	apiError(w, http.StatusServiceUnavailable, "the database did not answer; try again")
}

func apiError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
