-- Demo database "shop": customers, products, orders and the items of each order.
CREATE TABLE customer (
  customer_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  city TEXT,
  signup_year INTEGER
);
CREATE TABLE product (
  product_id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  category TEXT,
  price REAL,
  stock INTEGER
);
CREATE TABLE orders (
  order_id INTEGER PRIMARY KEY,
  customer_id INTEGER NOT NULL,
  order_date TEXT,
  status TEXT,
  FOREIGN KEY (customer_id) REFERENCES customer(customer_id)
);
CREATE TABLE order_item (
  order_id INTEGER NOT NULL,
  product_id INTEGER NOT NULL,
  quantity INTEGER,
  PRIMARY KEY (order_id, product_id),
  FOREIGN KEY (order_id) REFERENCES orders(order_id),
  FOREIGN KEY (product_id) REFERENCES product(product_id)
);
INSERT INTO customer VALUES (1, 'Alan Brooks', 'Boston', 2019);
INSERT INTO customer VALUES (2, 'Bianca Lopez', 'Chicago', 2020);
INSERT INTO customer VALUES (3, 'Chen Wei', 'Boston', 2021);
INSERT INTO customer VALUES (4, 'Diana Price', 'Denver', 2018);
INSERT INTO customer VALUES (5, 'Erik Olsen', 'Chicago', 2022);
INSERT INTO customer VALUES (6, 'Fiona Walsh', 'Austin', 2020);
INSERT INTO customer VALUES (7, 'George Adams', 'Denver', 2023);
INSERT INTO customer VALUES (8, 'Hannah Young', 'Boston', 2017);
INSERT INTO customer VALUES (9, 'Ivan Petrov', 'Austin', 2021);
INSERT INTO customer VALUES (10, 'Julia Santos', 'Chicago', 2023);
INSERT INTO product VALUES (1, 'Desk Lamp', 'Home', 24.99, 40);
INSERT INTO product VALUES (2, 'Coffee Mug', 'Kitchen', 8.5, 120);
INSERT INTO product VALUES (3, 'Wireless Mouse', 'Electronics', 19.99, 65);
INSERT INTO product VALUES (4, 'Mechanical Keyboard', 'Electronics', 89.0, 15);
INSERT INTO product VALUES (5, 'Chef Knife', 'Kitchen', 45.0, 30);
INSERT INTO product VALUES (6, 'Throw Pillow', 'Home', 15.75, 55);
INSERT INTO product VALUES (7, 'USB-C Cable', 'Electronics', 9.99, 200);
INSERT INTO product VALUES (8, 'Frying Pan', 'Kitchen', 32.0, 25);
INSERT INTO product VALUES (9, 'Wall Clock', 'Home', 28.5, 18);
INSERT INTO product VALUES (10, 'Noise Cancelling Headphones', 'Electronics', 149.0, 8);
INSERT INTO product VALUES (11, 'Tea Kettle', 'Kitchen', 27.25, 0);
INSERT INTO product VALUES (12, 'Yoga Mat', 'Sports', 22.0, 35);
INSERT INTO product VALUES (13, 'Water Bottle', 'Sports', 12.0, 90);
INSERT INTO product VALUES (14, 'Tennis Racket', 'Sports', 79.99, 12);
INSERT INTO orders VALUES (1, 1, '2024-01-03', 'delivered');
INSERT INTO orders VALUES (2, 2, '2024-01-10', 'delivered');
INSERT INTO orders VALUES (3, 1, '2024-01-22', 'delivered');
INSERT INTO orders VALUES (4, 3, '2024-02-05', 'shipped');
INSERT INTO orders VALUES (5, 4, '2024-02-14', 'delivered');
INSERT INTO orders VALUES (6, 5, '2024-02-28', 'cancelled');
INSERT INTO orders VALUES (7, 2, '2024-03-07', 'delivered');
INSERT INTO orders VALUES (8, 6, '2024-03-15', 'shipped');
INSERT INTO orders VALUES (9, 8, '2024-03-21', 'delivered');
INSERT INTO orders VALUES (10, 1, '2024-04-02', 'pending');
INSERT INTO orders VALUES (11, 9, '2024-04-11', 'delivered');
INSERT INTO orders VALUES (12, 4, '2024-04-19', 'cancelled');
INSERT INTO orders VALUES (13, 8, '2024-05-01', 'delivered');
INSERT INTO orders VALUES (14, 3, '2024-05-09', 'pending');
INSERT INTO orders VALUES (15, 2, '2024-05-18', 'shipped');
INSERT INTO orders VALUES (16, 6, '2024-05-27', 'delivered');
INSERT INTO order_item VALUES (1, 1, 1);
INSERT INTO order_item VALUES (1, 2, 4);
INSERT INTO order_item VALUES (2, 4, 1);
INSERT INTO order_item VALUES (2, 3, 1);
INSERT INTO order_item VALUES (3, 7, 3);
INSERT INTO order_item VALUES (4, 10, 1);
INSERT INTO order_item VALUES (4, 7, 2);
INSERT INTO order_item VALUES (5, 5, 1);
INSERT INTO order_item VALUES (5, 8, 1);
INSERT INTO order_item VALUES (5, 2, 2);
INSERT INTO order_item VALUES (6, 12, 1);
INSERT INTO order_item VALUES (7, 6, 2);
INSERT INTO order_item VALUES (7, 9, 1);
INSERT INTO order_item VALUES (8, 13, 3);
INSERT INTO order_item VALUES (8, 12, 1);
INSERT INTO order_item VALUES (9, 3, 2);
INSERT INTO order_item VALUES (9, 1, 1);
INSERT INTO order_item VALUES (10, 14, 1);
INSERT INTO order_item VALUES (11, 2, 6);
INSERT INTO order_item VALUES (11, 5, 1);
INSERT INTO order_item VALUES (12, 10, 1);
INSERT INTO order_item VALUES (13, 4, 1);
INSERT INTO order_item VALUES (13, 7, 5);
INSERT INTO order_item VALUES (14, 6, 1);
INSERT INTO order_item VALUES (15, 13, 2);
INSERT INTO order_item VALUES (15, 14, 1);
INSERT INTO order_item VALUES (16, 8, 2);
INSERT INTO order_item VALUES (16, 2, 1);
