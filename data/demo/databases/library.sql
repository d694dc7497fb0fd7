-- Demo database "library": authors, their books, members and loans.
CREATE TABLE author (
  author_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  country TEXT,
  birth_year INTEGER
);
CREATE TABLE book (
  book_id INTEGER PRIMARY KEY,
  title TEXT NOT NULL,
  author_id INTEGER NOT NULL,
  genre TEXT,
  pub_year INTEGER,
  pages INTEGER,
  FOREIGN KEY (author_id) REFERENCES author(author_id)
);
CREATE TABLE member (
  member_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  city TEXT,
  join_year INTEGER
);
CREATE TABLE loan (
  loan_id INTEGER PRIMARY KEY,
  book_id INTEGER NOT NULL,
  member_id INTEGER NOT NULL,
  loan_date TEXT,
  returned INTEGER,
  FOREIGN KEY (book_id) REFERENCES book(book_id),
  FOREIGN KEY (member_id) REFERENCES member(member_id)
);
INSERT INTO author VALUES (1, 'Clara Oswin', 'England', 1948);
INSERT INTO author VALUES (2, 'Mateo Ruiz', 'Spain', 1972);
INSERT INTO author VALUES (3, 'Ingrid Holm', 'Sweden', 1965);
INSERT INTO author VALUES (4, 'Kofi Mensah', 'Ghana', 1980);
INSERT INTO author VALUES (5, 'Yuki Tanaka', 'Japan', 1959);
INSERT INTO author VALUES (6, 'Lena Fischer', 'Germany', 1985);
INSERT INTO author VALUES (7, 'Omar Haddad', 'Egypt', 1951);
INSERT INTO author VALUES (8, 'Grace Miller', 'England', 1990);
INSERT INTO author VALUES (9, 'Pablo Serra', 'Spain', 1944);
INSERT INTO author VALUES (10, 'Anna Kowalska', 'Poland', 1977);
INSERT INTO book VALUES (1, 'The Quiet Harbour', 1, 'Novel', 1985, 320);
INSERT INTO book VALUES (2, 'Letters from Dover', 1, 'Novel', 1992, 280);
INSERT INTO book VALUES (3, 'A Short History of Tea', 1, 'History', 2001, 190);
INSERT INTO book VALUES (4, 'Sun over Seville', 2, 'Novel', 2005, 410);
INSERT INTO book VALUES (5, 'The Cartographer', 2, 'Mystery', 2012, 365);
INSERT INTO book VALUES (6, 'Northern Lights Cookbook', 3, 'Cooking', 1999, 150);
INSERT INTO book VALUES (7, 'Ice and Iron', 3, 'History', 2008, 520);
INSERT INTO book VALUES (8, 'Market Day', 4, 'Children', 2015, 48);
INSERT INTO book VALUES (9, 'The Gold Coast Trader', 4, 'Novel', 2019, 302);
INSERT INTO book VALUES (10, 'Cherry Blossom Rain', 5, 'Poetry', 1990, 96);
INSERT INTO book VALUES (11, 'The Silent Garden', 5, 'Mystery', 2003, 288);
INSERT INTO book VALUES (12, 'Code of the River', 6, 'Science', 2018, 240);
INSERT INTO book VALUES (13, 'Small Machines', 6, 'Science', 2021, 210);
INSERT INTO book VALUES (14, 'Sand and Stars', 7, 'Poetry', 1978, 120);
INSERT INTO book VALUES (15, 'The Nile Detective', 7, 'Mystery', 1988, 256);
INSERT INTO book VALUES (16, 'City of Bridges', 8, 'Novel', 2020, 344);
INSERT INTO book VALUES (17, 'The Last Lighthouse', 9, 'Novel', 1970, 298);
INSERT INTO book VALUES (18, 'Painting with Light', 9, 'Art', 1983, 176);
INSERT INTO book VALUES (19, 'The Winter Orchard', 10, 'Novel', 2010, 330);
INSERT INTO book VALUES (20, 'Numbers for Everyone', 10, 'Science', 2016, 198);
INSERT INTO member VALUES (1, 'Tom Baker', 'London', 2015);
INSERT INTO member VALUES (2, 'Sara Lind', 'Oxford', 2018);
INSERT INTO member VALUES (3, 'Jonas Berg', 'London', 2012);
INSERT INTO member VALUES (4, 'Maria Costa', 'Bristol', 2020);
INSERT INTO member VALUES (5, 'Ahmed Khan', 'Oxford', 2016);
INSERT INTO member VALUES (6, 'Julia Novak', 'London', 2021);
INSERT INTO member VALUES (7, 'Peter Walsh', 'Leeds', 2010);
INSERT INTO member VALUES (8, 'Emma Stone', 'Bristol', 2019);
INSERT INTO member VALUES (9, 'Liam Doyle', 'Leeds', 2022);
INSERT INTO member VALUES (10, 'Nina Petrova', 'London', 2017);
INSERT INTO member VALUES (11, 'Oscar Reyes', 'Oxford', 2023);
INSERT INTO member VALUES (12, 'Hana Sato', 'Bristol', 2014);
INSERT INTO member VALUES (13, 'Ruth Okafor', 'Leeds', 2024);
INSERT INTO member VALUES (14, 'Sam Ortiz', 'London', 2024);
INSERT INTO loan VALUES (1, 1, 1, '2023-01-05', 1);
INSERT INTO loan VALUES (2, 4, 1, '2023-02-11', 1);
INSERT INTO loan VALUES (3, 5, 2, '2023-02-14', 1);
INSERT INTO loan VALUES (4, 11, 3, '2023-03-01', 1);
INSERT INTO loan VALUES (5, 12, 3, '2023-03-09', 0);
INSERT INTO loan VALUES (6, 7, 4, '2023-03-20', 1);
INSERT INTO loan VALUES (7, 15, 5, '2023-04-02', 1);
INSERT INTO loan VALUES (8, 5, 5, '2023-04-18', 0);
INSERT INTO loan VALUES (9, 16, 6, '2023-05-06', 1);
INSERT INTO loan VALUES (10, 1, 7, '2023-05-12', 1);
INSERT INTO loan VALUES (11, 2, 7, '2023-05-30', 1);
INSERT INTO loan VALUES (12, 3, 7, '2023-06-15', 0);
INSERT INTO loan VALUES (13, 9, 8, '2023-06-21', 1);
INSERT INTO loan VALUES (14, 11, 8, '2023-07-04', 1);
INSERT INTO loan VALUES (15, 13, 10, '2023-07-19', 0);
INSERT INTO loan VALUES (16, 4, 10, '2023-08-02', 1);
INSERT INTO loan VALUES (17, 19, 12, '2023-08-15', 1);
INSERT INTO loan VALUES (18, 5, 12, '2023-09-01', 1);
INSERT INTO loan VALUES (19, 15, 1, '2023-09-10', 0);
INSERT INTO loan VALUES (20, 10, 2, '2023-10-03', 1);
INSERT INTO loan VALUES (21, 16, 3, '2023-10-22', 1);
INSERT INTO loan VALUES (22, 1, 4, '2023-11-08', 0);
INSERT INTO loan VALUES (23, 8, 6, '2023-11-20', 1);
INSERT INTO loan VALUES (24, 20, 9, '2023-12-01', 0);
INSERT INTO loan VALUES (25, 12, 10, '2023-12-12', 1);
INSERT INTO loan VALUES (26, 4, 11, '2024-01-09', 0);
INSERT INTO loan VALUES (27, 17, 12, '2024-01-17', 1);
INSERT INTO loan VALUES (28, 11, 5, '2024-02-02', 1);
INSERT INTO loan VALUES (29, 16, 2, '2024-02-20', 0);
INSERT INTO loan VALUES (30, 16, 7, '2024-03-03', 1);
