"""The seed: the FastAPI task service taskapp started from, rebuilt as bench/seed.py's baseline.

No code of the seed is on this machine, only its README (/work/shared/spec/seed-README.md), so
this is a reconstruction from it, written the way that README describes and the way such a
service is usually written, neither slowed down nor tuned: FastAPI with Pydantic response
models, SQLAlchemy's ORM on its asyncio extension with the asyncpg driver, an engine with the
default pool, one session per request from a dependency, `selectinload` for a task's
conversations; the tables `tasks` and `conversations` exactly as the README's "Database Schema"
gives them (no index but the primary keys), created at startup when missing. Run as the seed
runs, one uvicorn process:

    DATABASE_URL=postgresql+asyncpg://user:password@localhost:5432/taskdb \\
        uvicorn bench.seed_app:app

Endpoints: POST /tasks/, GET /tasks/ (with each task's conversation count; `skip` and `limit`,
default 100, as FastAPI's tutorials page a list), GET /tasks/{task_id} (with all conversations)
and GET /health: what the benchmark calls, and how it knows the server is up.

Left out: the background worker (the claim with SKIP LOCKED, the 6-7 s of processing; the
benchmark measures HTTP only, and taskapp runs with its worker off too), PUT and DELETE of
tasks, the conversation endpoints, GET /status, and SQLAlchemy's echo (a development setting
in the README: every statement logged).

Runs in the seed's own venv (bench/requirements-seed.txt): it imports nothing of taskapp's.
"""

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

DATABASE_URL = os.environ.get(
    "DATABASE_URL", "postgresql+asyncpg://user:password@localhost:5432/taskdb"
)
INSTANCE_ID = str(uuid.uuid4())

engine = create_async_engine(DATABASE_URL)
# Objects outlive the commit: the response is built from them after it, and an expired
# attribute would need a lazy load, which the asyncio extension cannot do implicitly.
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


# -- models: the README's "Database Schema" -----------------------------------------------------


class Base(DeclarativeBase):
    pass


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(255), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(String(50), server_default="pending")
    created_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processing_instance_id: Mapped[str | None] = mapped_column(String(255))

    conversations: Mapped[list["Conversation"]] = relationship(
        back_populates="task", cascade="all, delete-orphan", passive_deletes=True
    )


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    content: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str | None] = mapped_column(String(50), server_default="active")
    created_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    task: Mapped[Task] = relationship(back_populates="conversations")


# -- schemas ------------------------------------------------------------------------------------


class ConversationCreate(BaseModel):
    content: str


class TaskCreate(BaseModel):
    title: str
    description: str | None = None
    conversations: list[ConversationCreate] = []


class ConversationResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    task_id: int
    content: str
    status: str
    created_at: datetime
    updated_at: datetime


class TaskBase(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    description: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    processed_at: datetime | None
    processing_instance_id: str | None


class TaskResponse(TaskBase):
    conversations: list[ConversationResponse] = []


class TaskListResponse(TaskBase):
    conversation_count: int


# -- the app ------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = FastAPI(title="Task Management Service", lifespan=lifespan)


async def get_db() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(get_db)]


@app.post("/tasks/", response_model=TaskResponse)
async def create_task(task: TaskCreate, db: DbSession) -> Task:
    db_task = Task(
        title=task.title,
        description=task.description,
        conversations=[Conversation(content=c.content) for c in task.conversations],
    )
    db.add(db_task)
    # No reload afterwards: the INSERTs return the server defaults (status, timestamps), and
    # the conversations are the ones just added.
    await db.commit()
    return db_task


@app.get("/tasks/", response_model=list[TaskListResponse])
async def list_tasks(db: DbSession, skip: int = 0, limit: int = 100) -> list[TaskListResponse]:
    conversation_count = func.count(Conversation.id).label("conversation_count")
    result = await db.execute(
        select(Task, conversation_count)
        .outerjoin(Task.conversations)
        .group_by(Task.id)
        .order_by(Task.id)
        .offset(skip)
        .limit(limit)
    )
    return [
        TaskListResponse(
            id=task.id,
            title=task.title,
            description=task.description,
            status=task.status,
            created_at=task.created_at,
            updated_at=task.updated_at,
            processed_at=task.processed_at,
            processing_instance_id=task.processing_instance_id,
            conversation_count=count,
        )
        for task, count in result.all()
    ]


@app.get("/tasks/{task_id}", response_model=TaskResponse)
async def get_task(task_id: int, db: DbSession) -> Task:
    result = await db.execute(
        select(Task).options(selectinload(Task.conversations)).where(Task.id == task_id)
    )
    task = result.scalar_one_or_none()
    if task is None:
        raise HTTPException(status_code=404, detail="Task not found")
    return task


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy", "instance_id": INSTANCE_ID}
